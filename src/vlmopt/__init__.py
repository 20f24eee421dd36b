"""vlmopt: turn Hugging Face vision-language models into verified, fast deployment artifacts.

`import vlmopt` gives every stage as a function (`vlmopt.convert(DIR, ...)`, see `vlmopt.api`), loaded
on first use so that importing the package stays cheap.
"""

import importlib
import importlib.util

__version__ = "0.2.0"


def __getattr__(name: str):
    if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is not None:
        raise AttributeError(name)  # a submodule: the import system loads it
    api = importlib.import_module(f"{__name__}.api")
    if name in api.__all__:
        return getattr(api, name)
    raise AttributeError(f"module 'vlmopt' has no attribute '{name}'")
