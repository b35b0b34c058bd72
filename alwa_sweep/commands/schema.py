"""``alwa-sweep schema``: the JSON Schema of sweep specs, for editors (YAML language servers)."""

from __future__ import annotations

import json
from pathlib import Path



def add_arguments(parser) -> None:
    parser.add_argument("--out", help="write it to this file (default: print it)")


def run(args) -> int:
    from alwa_sweep.spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}; in a spec's first line: # yaml-language-server: $schema={args.out}")
    else:
        print(text)
    return 0
