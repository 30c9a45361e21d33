"""Where a compiled graph's peak memory is: replay the allocations of Inductor's generated code.

    TORCH_LOGS=output_code python my_script.py 2> code.log
    python benchmarks/replay_memory.py code.log [--top 20] [--extern-itemsize 2] [--symbol s77=1560]

For each compiled graph in the file (a ``TORCH_LOGS=output_code`` log, or a generated module from
Inductor's cache folder), this walks the ``call`` function line by line and prints its peak: the
line, the live bytes, and the buffers alive there, largest first (each storage once, with every
name it has at that point).

Why not Inductor's own estimate: the buffer-reuse planner decides with a per-scheduler-node
estimate (``EfficientPeakEstimate``) that counts an output computed in place as a new allocation
and places a concat's buffer at the concat, not where its first input is written into it; on the
Cosmos3 workload it is about 250 MB above the real peak (pytorch/pytorch#192578 is the open fix for
the first). The replay reads what the generated code does:

- ``bufN = empty_strided_*(size, stride, dtype)`` allocates the storage those strides span;
- ``bufM = bufN``, ``bufM = bufN[i]`` and ``bufM = reinterpret_tensor(bufN, ...)`` give that
  storage another name (Inductor's reuse lines are these, followed by ``del bufN``);
- ``del bufN`` frees the storage once no name refers to it, and so does ``return`` for every
  name it does not return;
- the graph's arguments belong to the caller and are never freed;
- ``bufN = torch.ops.<op>(...)`` (an op that returns a new tensor: attention, custom ops) is sized
  from the ``assert_size_stride`` that follows it, at ``--extern-itemsize`` bytes per element
  (the code does not say its dtype); such buffers are listed, and an op's workspace is not seen;
- dynamic sizes (``(s77, 23)``) need their symbols' values (``--symbol``): the generated code reads
  them from the inputs (``s77 = arg0_1``) and does not say them.

On one H200 the peak it printed for Cosmos3 (both backends) equalled
``torch.cuda.max_memory_allocated`` above the inputs to the byte (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import operator
import re
import sys
from pathlib import Path

ITEMSIZE = {"torch.float64": 8, "torch.int64": 8, "torch.float32": 4, "torch.int32": 4, "torch.bfloat16": 2,
            "torch.float16": 2, "torch.int16": 2, "torch.uint8": 1, "torch.int8": 1, "torch.bool": 1,
            "torch.float8_e4m3fn": 1, "torch.float8_e5m2": 1}
LOG_PREFIX = re.compile(r"^.*\[__output_code\] ?")
ALLOCATE = re.compile(r"(buf\w+) = empty_strided_\w+\((.*)\)$")
ALIAS = re.compile(r"(buf\w+) = (?:reinterpret_tensor\()?(buf\w+)\b")
NEW_FROM_OP = re.compile(r"(buf\w+) = (torch\.ops\.[\w.]+)\(")
SIZE_ASSERT = re.compile(r"assert_size_stride\((buf\w+), (.*)\)$")
DELETE = re.compile(r"\bdel ([\w, ]+)")


@dataclasses.dataclass
class Replay:
    body: list[str]  # the lines of call()
    live: list[int]  # live bytes after each line
    peak_line: int
    peak_alive: list[tuple[int, list[str]]]  # (bytes, names) per storage alive at the peak, largest first
    sized_from_asserts: list[tuple[str, str]]  # (buffer, op) sized at the assumed item size

    @property
    def peak(self) -> int:
        return self.live[self.peak_line] if self.live else 0


def call_bodies(text: str) -> list[list[str]]:
    """The body of each ``def call(self, args)`` (or ``def call(args)``) in the text, log prefixes removed."""
    lines = [LOG_PREFIX.sub("", line) for line in text.split("\n")]
    bodies = []
    for index, line in enumerate(lines):
        if re.match(r"\s*def call\((self, )?args\):", line):
            indent = len(line) - len(line.lstrip())
            body = []
            for following in lines[index + 1:]:
                if following.strip() and len(following) - len(following.lstrip()) <= indent:
                    break
                body.append(following.strip())
            bodies.append(body)
    return bodies


def _top_level(text: str) -> list[str]:
    """``text`` split at the commas outside any parentheses."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        if char == "," and depth == 0:
            parts.append(text[start:index].strip())
            start = index + 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


class SymbolicSize(KeyError):
    """A size depends on a symbol whose value was not given."""


def _value(node: ast.AST, symbols: dict[str, int]) -> int:
    """An integer size expression as Inductor prints them (``(-1) + 2*s77``, ``s0//2``, ``max(1, s0)``)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in symbols:
            raise SymbolicSize(node.id)
        return symbols[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand, symbols)
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        return ARITHMETIC[type(node.op)](_value(node.left, symbols), _value(node.right, symbols))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("max", "min"):
        return (max if node.func.id == "max" else min)(_value(arg, symbols) for arg in node.args)
    raise ValueError(f"not a size expression: {ast.unparse(node)}")


def _ints(text: str, symbols: dict[str, int]) -> tuple[int, ...]:
    """The integers of a printed tuple, ``(s77, 23)``."""
    inner = text.strip()
    if inner.startswith("(") and inner.endswith(")"):
        inner = inner[1:-1]
    return tuple(_value(ast.parse(part, mode="eval").body, symbols) for part in _top_level(inner))


def storage_bytes(size: tuple[int, ...], stride: tuple[int, ...], itemsize: int) -> int:
    """Bytes of the storage a (size, stride) view spans from offset 0."""
    if any(extent == 0 for extent in size):
        return 0
    return (sum((extent - 1) * step for extent, step in zip(size, stride)) + 1) * itemsize


def replay(body: list[str], extern_itemsize: int = 2, symbols: dict[str, int] | None = None) -> Replay:
    """Live bytes after each line of ``body``; ``symbols``: the values of the graph's size
    symbols (``s77``), where its sizes are dynamic."""
    symbols = symbols or {}
    storage_of: dict[str, int] = {}  # name -> storage id
    nbytes: dict[int, int] = {}
    unsized: dict[int, tuple[str, str]] = {}  # storages from ops, until an assert sizes them
    sized_from_asserts = []
    live_bytes, live, peak_line, peak_alive = 0, [], 0, []
    peak_bytes = -1

    def forget(name: str) -> int:
        storage = storage_of.pop(name, None)
        if storage is None or storage in storage_of.values():
            return 0
        return nbytes[storage]

    for line_number, line in enumerate(body):
        code = line.split("  #")[0]
        if match := ALLOCATE.match(code):
            size, stride, dtype = _top_level(match[2])[:3]
            storage = len(nbytes)
            nbytes[storage] = storage_bytes(_ints(size, symbols), _ints(stride, symbols), ITEMSIZE[dtype])
            storage_of[match[1]] = storage
            live_bytes += nbytes[storage]
        elif match := NEW_FROM_OP.match(line):
            storage = len(nbytes)
            nbytes[storage] = 0
            storage_of[match[1]] = storage
            unsized[storage] = (match[1], match[2])
        elif match := ALIAS.match(line):
            if match[2] in storage_of:
                storage_of[match[1]] = storage_of[match[2]]
        elif match := SIZE_ASSERT.match(code):
            storage = storage_of.get(match[1])
            if storage in unsized:
                size, stride = _top_level(match[2])[:2]
                nbytes[storage] = storage_bytes(_ints(size, symbols), _ints(stride, symbols), extern_itemsize)
                live_bytes += nbytes[storage]
                sized_from_asserts.append(unsized.pop(storage))
        if line.startswith("del ") or "; del " in line:
            for name in DELETE.search(line)[1].replace(" ", "").split(","):
                live_bytes -= forget(name)
        elif line.startswith("return"):  # the locals not returned die with the frame
            returned = set(re.findall(r"\bbuf\w+", line))
            for name in [name for name in storage_of if name not in returned]:
                live_bytes -= forget(name)
        live.append(live_bytes)
        if live_bytes > peak_bytes:
            peak_line, peak_bytes = line_number, live_bytes
            names: dict[int, list[str]] = {}
            for name, storage in storage_of.items():
                names.setdefault(storage, []).append(name)
            peak_alive = sorted(((nbytes[storage], sorted(group)) for storage, group in names.items()), reverse=True)
    return Replay(body, live, peak_line, peak_alive, sized_from_asserts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="a TORCH_LOGS=output_code log or a generated module (gzipped: .gz)")
    parser.add_argument("--top", type=int, default=20, help="buffers listed at each peak")
    parser.add_argument("--extern-itemsize", type=int, default=2,
                        help="bytes per element of tensors that ops return (their dtype is not in the code)")
    parser.add_argument("--symbol", action="append", default=[], metavar="NAME=VALUE",
                        help="a dynamic size's value, e.g. s77=1560 (the code's `s77 = arg0_1` says which input)")
    args = parser.parse_args(argv)
    symbols = {name: int(value) for name, value in (item.split("=") for item in args.symbol)}
    path = Path(args.path)
    bodies = call_bodies(gzip.open(path, "rt").read() if path.suffix == ".gz" else path.read_text())
    if not bodies:
        print(f"{args.path}: no generated call() found", file=sys.stderr)
        return 1
    for index, body in enumerate(bodies):
        try:
            result = replay(body, args.extern_itemsize, symbols)
        except SymbolicSize as missing:
            print(f"graph {index}: a size depends on {missing.args[0]}: give --symbol {missing.args[0]}=VALUE")
            continue
        print(f"graph {index}: peak {result.peak / 1e6:.3f} MB after line {result.peak_line} of call(): "
              f"{result.body[result.peak_line][:120]}")
        for size, names in result.peak_alive[:args.top]:
            print(f"  {size / 1e6:12.3f} MB  {', '.join(names)}")
        if result.sized_from_asserts:
            ops = sorted({op for _, op in result.sized_from_asserts})
            print(f"  ({len(result.sized_from_asserts)} tensors returned by ops, sized at {args.extern_itemsize} "
                  f"bytes per element: {', '.join(ops)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
