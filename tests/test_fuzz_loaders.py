"""Seeded fuzzing of the file loaders users feed: space and device YAML, measurement CSV (lut import), arch.json
and latency-table JSON. Each gets >= 1000 mutated files (byte edits, and edits of a parsed value); every one
must load or raise fbnas's one-line error type, nothing else."""
import json
import random
from pathlib import Path

import pytest
import yaml

from fbnas.errors import FbnasError
from fbnas.io import repo_root

REPO = repo_root()
N = 1000
ODD_VALUES = [None, True, 0, -1, 1, 3, 2 ** 63, 1e308, float("nan"), -0.5, "", "x", "../..", "a" * 300, [], {},
              [1, 2], {"a": 1}, "8", "w4a8", "ir_k3_e1", 7.5]


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # delete a range
            del b[i:i + rng.randint(1, 40)]
        elif op == 1:  # insert random bytes (also invalid UTF-8)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:  # duplicate a range
            j = rng.randrange(len(b))
            b[i:i] = b[j:j + rng.randint(1, 60)]
        elif op == 3 and b:  # flip a byte
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif op == 4:  # insert a structural character
            b[i:i] = rng.choice([b"{", b"}", b"[", b"]", b":", b",", b"\n", b"  ", b"\"", b"'", b"-", b"&a", b"*a",
                                 b"!!python/object:os.system", b"\x00"])
        else:  # truncate
            del b[i:]
    return bytes(b)


def mutate_value(obj, rng: random.Random):
    """Replace, delete or add one node somewhere in a parsed JSON/YAML value."""
    if not isinstance(obj, (dict, list)) or not obj or rng.random() < 0.15:
        return rng.choice(ODD_VALUES)
    if isinstance(obj, dict):
        key = rng.choice(list(obj))
        out = dict(obj)
        r = rng.random()
        if r < 0.15:
            del out[key]
        elif r < 0.25:
            out[rng.choice(["extra", "name", "x"])] = rng.choice(ODD_VALUES)
        else:
            out[key] = mutate_value(obj[key], rng)
        return out
    out = list(obj)
    i = rng.randrange(len(out))
    r = rng.random()
    if r < 0.15:
        del out[i]
    elif r < 0.25:
        out.insert(i, rng.choice(ODD_VALUES))
    else:
        out[i] = mutate_value(out[i], rng)
    return out


def fuzz(seed_text: str, parse, dump, load, tmp_path: Path, suffix: str, seed: int) -> dict:
    rng = random.Random(seed)
    base = seed_text.encode()
    tree = parse(seed_text)
    counts = {"ok": 0, "error": 0}
    path = tmp_path / f"case{suffix}"
    for i in range(N):
        if i % 2:
            data = mutate_bytes(base, rng)
        else:
            try:
                data = dump(mutate_value(tree, rng)).encode()
            except (ValueError, TypeError):  # e.g. nan in strict JSON
                data = mutate_bytes(base, rng)
        path.write_bytes(data)
        try:
            load(path)
            counts["ok"] += 1
        except FbnasError as exc:
            assert "\n" not in str(exc), (i, str(exc))
            counts["error"] += 1
        except Exception as exc:  # noqa: BLE001 - the point of the test
            (tmp_path / f"failing{suffix}").write_bytes(data)
            raise AssertionError(f"case {i}: {type(exc).__name__}: {exc} (file kept: failing{suffix})") from exc
    return counts


def yaml_dump(obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False)


def test_fuzz_space_yaml(tmp_path):
    from fbnas.space import load_space

    text = (REPO / "search_spaces" / "fmnist.yaml").read_text()
    counts = fuzz(text, yaml.safe_load, yaml_dump, load_space, tmp_path, ".yaml", seed=1)
    assert counts["ok"] > 0 and counts["error"] > N / 4, counts


def test_fuzz_device_yaml(tmp_path):
    from fbnas.latency import load_device

    text = (REPO / "conf" / "device" / "sd835.yaml").read_text()
    counts = fuzz(text, yaml.safe_load, yaml_dump, load_device, tmp_path, ".yaml", seed=2)
    assert counts["ok"] > 0 and counts["error"] > N / 4, counts


def test_fuzz_arch_json(tmp_path):
    from fbnas import Arch, load_space
    from fbnas.arch import load_arch

    arch = Arch.from_space(load_space("fmnist"),
                           ["ir_k3_e1", "skip", "shuffle_k3", "sqnxt_k3", "ir_k3_e3", "ir_k5_e3"], 4, 8)
    arch.save(tmp_path / "seed.json")
    text = (tmp_path / "seed.json").read_text()
    counts = fuzz(text, json.loads, lambda o: json.dumps(o, allow_nan=False), load_arch, tmp_path, ".json", seed=3)
    assert counts["ok"] > 0 and counts["error"] > N / 4, counts


def test_fuzz_latency_table_json(tmp_path):
    from fbnas.latency import load_table

    raw = json.loads((REPO / "latency_tables" / "fmnist__sd835.json").read_text())
    raw["entries"] = dict(list(raw["entries"].items())[:12])  # a small seed: the fields, not the bulk, matter
    text = json.dumps(raw, indent=1)
    counts = fuzz(text, json.loads, lambda o: json.dumps(o, allow_nan=False), load_table, tmp_path, ".json", seed=4)
    assert counts["ok"] > 0 and counts["error"] > N / 4, counts


def test_fuzz_measurement_csv(tmp_path):
    from fbnas.latency.keys import space_signatures
    from fbnas.latency.transfer import import_csv
    from fbnas.space import load_space

    space = load_space("fmnist")
    keys = sorted(space_signatures(space))
    text = "key,p50,p10,p90,n\n" + "".join(f"{k},{0.1 + i / 1000:.4f},0.05,0.3,5\n" for i, k in enumerate(keys))

    def parse(t):
        return [line.split(",") for line in t.splitlines()]

    def dump(rows):
        return "".join(",".join(str(c) for c in (r if isinstance(r, list) else [r])) + "\n"
                       for r in (rows if isinstance(rows, list) else [rows]))

    counts = fuzz(text, parse, dump, lambda p: import_csv(p, space, "fuzzdev"), tmp_path, ".csv", seed=5)
    assert counts["error"] > N / 4, counts
