"""The `cptjax ...` commands users read: in the README and the pages it links, and in a config
file's header. test_readme runs them as written; test_plan leaves to it the TPU configs whose plan
command the README shows, so no program is compiled twice."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where users read commands: the README, then the pages it links, in this order (a command shown on
# several pages runs once, where it first appears).
PAGES = ["README.md", "docs/training.md", "docs/data.md", "docs/scaling.md", "docs/conversion.md",
         "docs/measuring.md"]


def commands(text: str, commented: bool = False) -> list[str]:
    """`cptjax ...` lines of bash blocks (of a config header's comment when `commented`), joined
    across backslash continuations, without trailing comments and [--optional] parts."""
    joined = re.sub(r"\\\n#?\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"^#\s+", "", line) if commented else line
        if line.startswith("cptjax "):
            line = re.sub(r"\s+#.*$", "", re.sub(r"\[--[^\]]*\]", "", line)).strip()
            found.append(re.sub(r"\s+", " ", line))
    return found


def documented_commands() -> list[str]:
    found = []
    for page in PAGES:
        for command in commands("\n".join(re.findall(r"```bash\n(.*?)```", (ROOT / page).read_text(), re.S))):
            if command not in found:
                found.append(command)
    return found


def option(command: str, name: str) -> str | None:
    """The value of `--name VALUE` in a command line, or None."""
    match = re.search(rf"(?:^|\s){re.escape(name)}\s+(\S+)", command)
    return match.group(1) if match else None


def documented_tpu_plans() -> dict[str, tuple[str, str]]:
    """config file name -> (--topology, --hf-config file name) of each documented `cptjax plan
    --topology` command."""
    plans = {}
    for command in documented_commands():
        if command.startswith("cptjax plan") and option(command, "--topology"):
            plans[Path(option(command, "--config")).name] = (option(command, "--topology"),
                                                             Path(option(command, "--hf-config") or "").parent.name)
    return plans
