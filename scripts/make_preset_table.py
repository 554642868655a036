"""Writes the table of built-in presets into README.md, from the registry.

The table (one row per preset in `presets/*.json`: aliases, family, scale,
parameters, FLOPs, where the weights live, training data and accuracy) goes
between the lines `<!-- presets-table:begin -->` and
`<!-- presets-table:end -->`; nothing else in the README changes.

Usage:
    python scripts/make_preset_table.py           # rewrite README.md
    python scripts/make_preset_table.py --check   # exit 1 if it is stale
"""

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN = "<!-- presets-table:begin -->"
END = "<!-- presets-table:end -->"


def render(text, table):
    """Returns `text` with the table between the markers replaced."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ValueError(
            f"README.md must hold exactly one {BEGIN!r} and one {END!r} line."
        )
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that README.md is up to date",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from keras_mobile_moe import preset_registry

    text = README.read_text(encoding="utf-8")
    new = render(text, preset_registry.markdown_table())
    if args.check:
        if new != text:
            print(
                "README.md preset table is stale: run "
                "python scripts/make_preset_table.py"
            )
            return 1
        print("README.md preset table is up to date")
        return 0
    README.write_text(new, encoding="utf-8")
    print(f"wrote the preset table into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
