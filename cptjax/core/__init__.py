"""What every layer uses, and which imports no other part of cptjax: the one user-facing error
(errors.py), the dtype table (dtypes.py), user paths local or gs:// (paths.py), progress bars
(progress.py), output folders that appear whole or not at all (atomic_dir.py), and YAML -> typed
frozen config dataclasses (config_tree.py).
"""
