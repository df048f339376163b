"""Every logical axis has exactly one rule, and no parameter puts a mesh axis on two dimensions."""

import pytest
import tiny_configs
from flax import nnx

from cptjax.core.errors import CptjaxError
from cptjax.model.config import ModelConfig
from cptjax.model.sharding import ACTIVATION_AXES, DEFAULT_RULES, PARAM_AXES, check_rules, logical_to_spec
from cptjax.model.transformer import abstract_model


def test_default_rules_cover_each_name_once():
    check_rules(DEFAULT_RULES)
    names = [name for name, _ in DEFAULT_RULES]
    assert sorted(names) == sorted(PARAM_AXES + ACTIVATION_AXES)


def test_rules_with_a_duplicate_or_a_gap_are_refused():
    with pytest.raises(CptjaxError, match="more than one rule"):
        check_rules(DEFAULT_RULES + (("embed", "tensor"),))
    with pytest.raises(CptjaxError, match="have no rule"):
        check_rules(tuple(r for r in DEFAULT_RULES if r[0] != "mlp"))
    with pytest.raises(CptjaxError, match="no rule for logical axis 'embd'"):
        logical_to_spec(("embd",), DEFAULT_RULES)


@pytest.mark.parametrize("name", tiny_configs.NAMES + sorted(tiny_configs.BUILT))
def test_every_parameter_maps_without_reusing_a_mesh_axis(name):
    model = abstract_model(ModelConfig.from_hf_config(tiny_configs.full_config(name)))
    state = nnx.state(model, nnx.Param)
    seen = set()
    for path, variable in nnx.to_flat_state(state):
        names = variable.get_metadata()["out_sharding"]
        assert len(names) == len(variable.shape), path
        assert set(names) <= set(PARAM_AXES), path
        logical_to_spec(names, DEFAULT_RULES)  # raises if a mesh axis is used twice
        seen.update(names)
    assert seen >= {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}


def test_a_rule_set_that_reuses_a_mesh_axis_is_caught():
    rules = tuple((n, "tensor") if n == "embed" else (n, a) for n, a in DEFAULT_RULES)
    with pytest.raises(CptjaxError, match=r"mesh axes \['tensor'\] used twice"):
        logical_to_spec(("mlp", "embed"), rules)


def test_activation_constraints_reach_the_traced_program():
    """jit traces at the first call: the wrapper must put the constraints in the program."""
    import jax
    import jax.numpy as jnp

    from cptjax.model.sharding import MeshConfig, activation_sharding, constrain, make_mesh, with_activation_sharding

    mesh = make_mesh(MeshConfig())
    fn = lambda x: constrain(x, ("activation_batch", "activation_length"))  # noqa: E731
    with activation_sharding(mesh):
        wrapped_around_jit = jax.jit(fn)  # the old pattern: traced later, outside the context
    assert "sharding_constraint" not in str(jax.make_jaxpr(wrapped_around_jit)(jnp.ones((2, 3))))
    assert "sharding_constraint" in str(jax.make_jaxpr(jax.jit(with_activation_sharding(fn, mesh)))(jnp.ones((2, 3))))
