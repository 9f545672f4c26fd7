"""What `pip install` changed in an environment: two `pip freeze` files, before and after.
Exits 1 when a package already installed was upgraded or removed, or when a test or font
package came in; a downgrade (pip fitting a new package to what is there) is printed."""

import sys
from pathlib import Path

from packaging.version import Version

UNWANTED = ("pytest", "hypothesis", "fontpkg")  # the extras [test] and [demo]


def pins(path: str) -> dict[str, str]:
    """name -> version of each `name==version` line of a `pip freeze` file."""
    lines = (line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return dict(line.lower().split("==", 1) for line in lines if "==" in line)


def main(before_path: str, after_path: str) -> int:
    before, after = pins(before_path), pins(after_path)
    upgraded = [f"{name} {old} -> {after.get(name, 'removed')}" for name, old in before.items()
                if name not in after or Version(after[name]) > Version(old)]
    downgraded = [f"{name} {old} -> {after[name]}" for name, old in before.items()
                  if name in after and Version(after[name]) < Version(old)]
    unwanted = [name for name in after if name not in before and name.startswith(UNWANTED)]
    for label, names in (("upgraded or removed", upgraded), ("downgraded", downgraded),
                         ("test or font packages installed", unwanted)):
        print(f"pip install -e . {label}: {', '.join(names) or 'none'}")
    return 1 if upgraded or unwanted else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
