"""Write a large generated `aidial.config.json`: 100,000 keys, 1,000 models, 50 roles.

What `bench/reload_stall.py` serves to measure start-up, memory and reloads with a config of
the size a large deployment has. Deterministic: the same arguments write the same bytes.

    .venv/bin/python bench/big_config.py OUT.json [--keys 100000] [--models 1000] [--roles 50]

Every key gets one or two of the roles (so role sets repeat, as they do in real configs) and
one of 2,000 projects; every model two upstreams, a price and `userRoles` of three roles; every
role limits for ten models. One extra key, `ADMIN_KEY` below, has the role `admin`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

ADMIN_KEY = "bench-admin-key-0123456789abcdef0123456789"
UPSTREAM = "http://127.0.0.1:9/v1/chat/completions"  # never called: /health is measured


def _secret(index: int) -> str:
    return "bk-" + hashlib.sha256(f"bench key {index}".encode()).hexdigest()[:40]


def generate(keys: int, models: int, roles: int) -> dict[str, Any]:
    role_names = [f"role-{r:02d}" for r in range(roles)]
    model_names = [f"model-{m:04d}" for m in range(models)]
    tree: dict[str, Any] = {
        "models": {
            name: {
                "type": "chat",
                "endpoint": UPSTREAM,
                "displayName": f"Model {m}",
                "userRoles": [role_names[(m + i) % roles] for i in range(3)],
                "upstreams": [
                    {"endpoint": UPSTREAM, "key": f"upstream-{m}-a"},
                    {"endpoint": UPSTREAM, "key": f"upstream-{m}-b", "weight": 2},
                ],
                "pricing": {"unit": "token", "prompt": "0.000001", "completion": "0.000002"},
            }
            for m, name in enumerate(model_names)
        },
        "roles": {
            name: {
                "limits": {
                    model_names[(r * 10 + i) % models]: {"minute": "100000", "day": "10000000"}
                    for i in range(10)
                }
            }
            for r, name in enumerate(role_names)
        },
        "keys": {
            _secret(k): {
                "project": f"project-{k % 2000:04d}",
                "roles": (
                    [role_names[k % roles]]
                    if k % 3
                    else [role_names[k % roles], role_names[(k // 7) % roles]]
                ),
            }
            for k in range(keys)
        },
    }
    tree["keys"][ADMIN_KEY] = {"project": "bench-admin", "roles": ["admin"]}
    return tree


def write(path: Path, keys: int = 100_000, models: int = 1_000, roles: int = 50) -> None:
    path.write_text(json.dumps(generate(keys, models, roles), indent=1), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--models", type=int, default=1_000)
    parser.add_argument("--roles", type=int, default=50)
    args = parser.parse_args()
    write(args.out, args.keys, args.models, args.roles)
    print(f"{args.out}: {args.out.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
