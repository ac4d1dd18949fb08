"""The configs that ship inside the package: DeepSpeed engine JSONs (`ds/`) and recipes (`recipes/`).

Each is chosen by name or by path: `--ds_config zero2_fp16`, `--config imdb-bert-base`, or any file. A
path that exists wins; otherwise a name (with or without its suffix) is a file here. The checkout's
top-level `ds_configs/` and `recipes/` are links to these two folders (one copy of each file), and a
relative `ds_configs/<name>.json` or `recipes/<name>.yaml` that does not exist where you are resolves
here too, so the paths in the README and in recipes work from any directory, with or without a checkout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dapt.errors import DaptError

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Kind:
    what: str  # for messages
    folder: Path
    suffixes: tuple[str, ...]
    checkout_dir: str  # the same files at the top of a checkout


DS = Kind("DeepSpeed config", HERE / "ds", (".json",), "ds_configs")
RECIPE = Kind("recipe", HERE / "recipes", (".yaml", ".yml", ".json"), "recipes")


def names(kind: Kind) -> list[str]:
    """The packaged names of one kind, sorted."""
    return sorted(p.name[:-len(p.suffix)] for p in kind.folder.iterdir() if p.suffix in kind.suffixes)


def find(kind: Kind, value: str) -> Path:
    """The file `value` names: an existing path, else a packaged name; else a one-line DaptError that
    lists the names."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    stem = path.name[:-len(path.suffix)] if path.suffix in kind.suffixes else path.name
    if not path.is_absolute() and str(path.parent) in (".", kind.checkout_dir):
        for suffix in kind.suffixes:
            packaged = kind.folder / f"{stem}{suffix}"
            if packaged.is_file():
                return packaged
    raise DaptError(f"{kind.what} not found: {value} (give a file, or one of the names: {', '.join(names(kind))})")


def find_ds_config(value: str) -> Path:
    return find(DS, value)


def find_recipe(value: str) -> Path:
    return find(RECIPE, value)
