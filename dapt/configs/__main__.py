"""`python -m dapt.configs`: the packaged names; `python -m dapt.configs ds|recipe VALUE`: the file VALUE
names (absolute), or one error line and exit 2 (slurm/launch.sh checks DAPT_DS_CONFIG and DAPT_CONFIG so)."""
import sys

from dapt.configs import DS, RECIPE, find, names
from dapt.errors import DaptError

KINDS = {"ds": DS, "recipe": RECIPE}


def main(argv: list[str]) -> int:
    if not argv:
        for key, kind in KINDS.items():
            print(f"{key} ({kind.folder}): {' '.join(names(kind))}")
        return 0
    if len(argv) != 2 or argv[0] not in KINDS:
        print("usage: python -m dapt.configs [ds|recipe NAME_OR_PATH]", file=sys.stderr)
        return 2
    try:
        print(find(KINDS[argv[0]], argv[1]).resolve())
    except DaptError as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
