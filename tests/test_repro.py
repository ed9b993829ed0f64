"""lora_edu.repro: one seed makes Python, NumPy and PyTorch draw the same numbers; the device
is chosen CUDA, then MPS, then CPU; and no chapter sends float64 to the device (MPS has none)."""

import ast
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_edu.repro import (
    DEFAULT_SEED,
    DEVICE_ENV,
    configure_deterministic_mode,
    get_device,
    seed_all,
)


def _draws() -> tuple[float, np.ndarray, torch.Tensor]:
    return random.random(), np.random.rand(4), torch.rand(4)


def test_same_seed_same_draws_from_all_three_generators():
    seed_all(123)
    first = _draws()
    seed_all(123)
    second = _draws()
    assert first[0] == second[0]
    np.testing.assert_array_equal(first[1], second[1])
    assert torch.equal(first[2], second[2])


def test_different_seeds_differ_in_every_generator():
    seed_all(1)
    a = _draws()
    seed_all(2)
    b = _draws()
    assert a[0] != b[0]
    assert not np.array_equal(a[1], b[1])
    assert not torch.equal(a[2], b[2])


def test_returns_the_seed_and_defaults_to_1992():
    assert seed_all() == DEFAULT_SEED == 1992
    assert seed_all(np.uint32(7)) == 7


def test_seed_torch_false_leaves_torch_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    seed_all(99, seed_torch=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("seed", [-1, 2**32, 10**20])
def test_seed_outside_unsigned_32_bit_range_raises(seed):
    with pytest.raises(ValueError, match=r"unsigned 32-bit range \[0, 4294967295\]"):
        seed_all(seed)


@pytest.mark.parametrize("seed", [1.5, "42", None, True])
def test_non_integer_seed_raises_type_error(seed):
    with pytest.raises(TypeError, match="seed must be an int"):
        seed_all(seed)


def test_boundaries_of_the_range_are_accepted():
    assert seed_all(0) == 0
    assert seed_all(2**32 - 1) == 2**32 - 1


def test_deterministic_mode_is_switched_on():
    configure_deterministic_mode()
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark is False


def test_get_device_is_a_usable_device():
    device = get_device()
    assert device.type in {"cuda", "mps", "cpu"}
    assert torch.zeros(1, device=device).device.type == device.type


# ------------------------------------------------------------------------------ get_device
def _backends(monkeypatch, cuda: bool, mps: bool | None) -> None:
    """Pretend the runtime has CUDA and/or MPS (``mps=None``: no ``torch.backends.mps``)."""
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if mps is None:
        monkeypatch.delattr(torch.backends, "mps", raising=False)
    else:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"),     # CUDA first, even on a machine that also has MPS
    (True, False, "cuda"),
    (False, True, "mps"),     # a Mac
    (False, False, "cpu"),
    (False, None, "cpu"),     # a build without torch.backends.mps
])
def test_get_device_prefers_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    _backends(monkeypatch, cuda, mps)
    assert get_device() == torch.device(expected)


def test_get_device_obeys_the_environment_variable(monkeypatch):
    _backends(monkeypatch, cuda=True, mps=True)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert get_device() == torch.device("cpu")
    monkeypatch.setenv(DEVICE_ENV, " MPS ")
    assert get_device() == torch.device("mps")


@pytest.mark.parametrize("value, message", [("tpu", "is not a device type"),
                                            ("cuda", "has no cuda device")])
def test_get_device_refuses_an_unknown_or_missing_device(monkeypatch, value, message):
    _backends(monkeypatch, cuda=False, mps=False)
    monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(ValueError, match=message):
        get_device()


# ----------------------------------------------------- every device: float64 stays on the CPU
# MPS has no float64. The book's rule (DESIGN.md): float64 work stays on the CPU, and tensors
# that meet are on one device. The scan below reads every chapter's code cells and follows, in
# order, which names hold float64 tensors (or modules) and which live on the accelerator
# (``device = get_device()``, ``.to(device)``, ``device=device``, ``.cuda()``, a module built
# from one). It flags an operation whose result is both float64 and on the device: a float64
# tensor created on or moved to ``device``, ``.double()`` of a tensor on the device, and
# arithmetic that mixes a float64 (CPU) tensor with a device tensor. It cannot see through the
# package's functions, so it under-reports; it does not guess.

BOOK = Path(__file__).resolve().parents[1] / "book"
_F64_ATTRS = {"float64", "double"}
_OTHER_DTYPES = {"float32", "float", "float16", "half", "bfloat16", "int64", "long", "int32",
                 "int", "int8", "uint8", "bool", "complex64"}
_CASTS = {"float", "half", "bfloat16", "int", "long", "bool"}
_NOT_TENSORS = {"item", "tolist", "numpy", "size", "dim", "numel", "data_ptr"}
_PLACEMENT = {"dtype", "device", "map_location"}
_NAMESPACES = {"torch", "nn", "F", "np", "numpy", "math", "peft", "transformers"}
_CELL_OPEN = re.compile(r"^```\{code-cell\}")


def code_cells(path: Path) -> list[tuple[int, str]]:
    """(line of the cell's first code line in ``path``, code) for every code cell."""
    lines = path.read_text(encoding="utf-8").splitlines()
    cells, i = [], 0
    while i < len(lines):
        if not _CELL_OPEN.match(lines[i]):
            i += 1
            continue
        i += 1
        if i < len(lines) and lines[i].strip() == "---":   # a YAML options block
            i += 1
            while lines[i].strip() != "---":
                i += 1
            i += 1
        while i < len(lines) and lines[i].startswith(":") and not lines[i].startswith("::"):
            i += 1                                           # :tags: and other options
        start, body = i, []
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        cells.append((start + 1, "\n".join(body)))
    return cells


def _without_magics(code: str) -> str:
    """IPython magics (``%pip``, ``!ls``) as ``pass``, keeping indentation and line numbers."""
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in code.splitlines())


class Float64DeviceScan:
    """Follows float64 and on-device values through a chapter's cells, in order."""

    def __init__(self) -> None:
        self.f64_dtypes: set[str] = set()      # names bound to torch.float64
        self.devices: set[str] = {"device"}    # names bound to the accelerator device
        self.f64: set[str] = set()             # names bound to float64 tensors or modules
        self.on_device: set[str] = set()       # names bound to tensors or modules on it
        self.findings: list[tuple[int, str]] = []

    # -- what an expression is
    def is_f64_dtype(self, node: ast.AST) -> bool:
        return ((isinstance(node, ast.Attribute) and node.attr in _F64_ATTRS)
                or (isinstance(node, ast.Name) and node.id in self.f64_dtypes))

    @staticmethod
    def is_other_dtype(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr in _OTHER_DTYPES
                and isinstance(node.value, ast.Name) and node.value.id == "torch")

    def is_device(self, node: ast.AST) -> bool:
        """An accelerator: ``device``, ``"cuda"``, ``torch.device("mps")``, ``t.device`` of a
        tensor on it, ``get_device()``."""
        if isinstance(node, ast.Name):
            return node.id in self.devices
        if isinstance(node, ast.Constant):
            return isinstance(node.value, str) and node.value.split(":")[0] in ("cuda", "mps")
        if isinstance(node, ast.Attribute) and node.attr == "device":
            return self.f64_and_dev(node.value)[1]
        if isinstance(node, ast.Call):
            name = _callee(node)
            if name == "get_device":
                return True
            if name == "device" and node.args:
                return self.is_device(node.args[0])
        return False

    @staticmethod
    def is_cpu(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value == "cpu"
        return (isinstance(node, ast.Call) and _callee(node) == "device" and bool(node.args)
                and isinstance(node.args[0], ast.Constant) and node.args[0].value == "cpu")

    def f64_and_dev(self, node: ast.AST) -> tuple[bool, bool]:
        """(is float64, is on the device) for the value of ``node``."""
        if isinstance(node, ast.Name):
            return node.id in self.f64, node.id in self.on_device
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Starred)):
            if isinstance(node, ast.Attribute) and node.attr in ("dtype", "device", "shape"):
                return False, False
            return self.f64_and_dev(node.value)
        if isinstance(node, ast.BinOp):
            (f1, d1), (f2, d2) = self.f64_and_dev(node.left), self.f64_and_dev(node.right)
            return f1 or f2, d1 or d2
        if isinstance(node, ast.UnaryOp):
            return self.f64_and_dev(node.operand)
        if isinstance(node, (ast.Tuple, ast.List)):
            parts = [self.f64_and_dev(e) for e in node.elts]
            return any(f for f, _ in parts), any(d for _, d in parts)
        if isinstance(node, ast.Call):
            return self._call(node)
        return False, False

    def _call(self, node: ast.Call) -> tuple[bool, bool]:
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        func = node.func
        method = func.attr if isinstance(func, ast.Attribute) else None
        receiver = (func.value if isinstance(func, ast.Attribute) and not _namespace(func.value)
                    else None)                # x.double(): x; torch.randn(...): none
        rf, rd = self.f64_and_dev(receiver) if receiver is not None else (False, False)
        inputs = [self.f64_and_dev(a) for a in node.args] + [
            self.f64_and_dev(v) for k, v in kw.items() if k not in _PLACEMENT]
        if isinstance(func, ast.Name):        # a function or a module: f(x), layer(x)
            inputs.append(self.f64_and_dev(func))
        f64 = rf or any(f for f, _ in inputs)
        dev = rd or any(d for _, d in inputs)
        if method == "to":
            targets = list(node.args) + [kw[k] for k in ("dtype", "device") if k in kw]
            if any(self.is_f64_dtype(t) for t in targets):
                f64 = True
            elif any(self.is_other_dtype(t) for t in targets):
                f64 = False
            else:
                f64 = rf
            if any(self.is_device(t) for t in targets):
                dev = True
            elif any(self.is_cpu(t) for t in targets):
                dev = False
            else:
                dev = rd
            return f64, dev
        if method == "double":
            f64 = True
        elif method in _CASTS:
            f64 = False
        elif method in _NOT_TENSORS:
            return False, False
        elif method == "cuda":
            dev = True
        elif method == "cpu":
            dev = False
        if "dtype" in kw:
            f64 = self.is_f64_dtype(kw["dtype"])
        for key in ("device", "map_location"):
            if key in kw:
                dev = self.is_device(kw[key])
        return f64, dev

    # -- walking a chapter
    def scan(self, tree: ast.AST, line_of: int) -> None:
        events = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Call, ast.BinOp)):
                events.append((node.end_lineno, node.end_col_offset, 0, node))
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                events.append((node.end_lineno, node.end_col_offset, 1, node))
        for *_, node in sorted(events, key=lambda e: e[:3]):
            if isinstance(node, (ast.Call, ast.BinOp)):
                self._check(node, line_of)
            else:
                self._bind(node)

    def _check(self, node: ast.AST, line_of: int) -> None:
        if isinstance(node, ast.Call) and _callee(node) == "set_default_dtype" and node.args \
                and self.is_f64_dtype(node.args[0]):
            self.findings.append((line_of + node.lineno - 1, "set_default_dtype(float64)"))
            return
        if self.f64_and_dev(node) != (True, True):
            return
        inner = (child for child in ast.walk(node) if child is not node
                 and isinstance(child, ast.expr))
        if any(self.f64_and_dev(child) == (True, True) for child in inner):
            return                     # reported where it started, not at every later use
        self.findings.append((line_of + node.lineno - 1, ast.unparse(node)[:90]))

    def _bind(self, node: ast.AST) -> None:
        value = node.value
        if value is None:
            return
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        f64, dev = self.f64_and_dev(value)
        is_dtype, is_dev = self.is_f64_dtype(value), self.is_device(value)
        if isinstance(node, ast.AugAssign):   # x += y keeps x's own flags and adds y's
            f64 = f64 or any(n in self.f64 for n in names)
            dev = dev or any(n in self.on_device for n in names)
        for name in names:
            for flag, group in ((f64, self.f64), (dev, self.on_device),
                                (is_dtype, self.f64_dtypes), (is_dev, self.devices)):
                (group.add if flag else group.discard)(name)


def _namespace(node: ast.AST) -> bool:
    """``torch``, ``torch.linalg``, ``nn``: a module of functions, not a value."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id in _NAMESPACES


def _callee(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)


def float64_on_device(path: Path) -> list[tuple[int, str]]:
    """(line, code) of every operation in ``path``'s code cells that puts float64 on the
    device, in order. Cells are read as one program, as the kernel runs them."""
    scan = Float64DeviceScan()
    for line, code in code_cells(path):
        try:
            tree = ast.parse(_without_magics(code))
        except SyntaxError as err:
            raise AssertionError(f"{path.name}:{line}: cell does not parse: {err}") from None
        scan.scan(tree, line)
    return sorted(set(scan.findings))


# ---------------------------------------------------------------------- the scan, tested
@pytest.mark.parametrize("code", [
    "W = torch.randn(3, 3, dtype=torch.float64).to(device)",
    "B = torch.zeros(3, 3, dtype=torch.float64, device=device)",
    "f64 = torch.float64\nB = torch.zeros(3, dtype=f64, device=device)",
    "W = torch.randn(3, 3, dtype=torch.float64)\nW_dev = W.to(device)",
    "x = torch.randn(3, device=device)\ny = x.double()",
    "x = torch.randn(3).to(device)\ny = x.to(torch.float64)",
    "model = nn.Linear(3, 3).to(device)\nout = model(torch.ones(3, dtype=torch.float64))",
    "W = torch.randn(3, 3, dtype=torch.float64)\nx = torch.randn(3, device=device)\ny = W @ x",
    "torch.set_default_dtype(torch.float64)",
    "dev = get_device()\nW = torch.eye(3, dtype=torch.double, device=dev)",
    "W = torch.eye(3).cuda().double()",
])
def test_the_scan_flags_float64_on_the_device(tmp_path, code):
    chapter = tmp_path / "99_x.md"
    chapter.write_text(f"# X\n\n```{{code-cell}} ipython3\n{code}\n```\n", encoding="utf-8")
    assert float64_on_device(chapter), f"not flagged: {code!r}"


@pytest.mark.parametrize("code", [
    "W = torch.randn(3, 3, dtype=torch.float64)\ns = torch.linalg.svdvals(W)",
    "W = torch.randn(3, 3, dtype=torch.float64)\nW_dev = W.float().to(device)",
    "W = torch.randn(3, 3, dtype=torch.float64)\nW_dev = W.to(device, torch.float32)",
    "x = torch.randn(3, device=device)\ny = x.cpu().double()",
    "x = torch.randn(3, device=device)\nx64 = x.detach().cpu().to(torch.float64)",
    "layer64 = nn.Linear(5, 4).double()\nout = layer64(torch.randn(3, 5, dtype=torch.float64))",
    ("x = torch.randn(3, device=device)\nval = x.norm().item()\n"
     "z = torch.tensor(val, dtype=torch.float64)"),
    "W = torch.randn(3, 3, dtype=torch.float64, device='cpu')",
    "%pip install x\nx = torch.ones(3, device=device)",
])
def test_the_scan_accepts_float64_kept_on_the_cpu(tmp_path, code):
    chapter = tmp_path / "99_x.md"
    chapter.write_text(f"# X\n\n```{{code-cell}} ipython3\n:tags: [remove-cell]\n{code}\n```\n",
                       encoding="utf-8")
    assert float64_on_device(chapter) == []


def test_the_scan_reports_the_line_in_the_markdown_file(tmp_path):
    chapter = tmp_path / "99_x.md"
    chapter.write_text("# X\n\ntext\n\n```{code-cell} ipython3\n---\nmystnb:\n  image:\n"
                       "    alt: a\n---\nx = 1\nW = torch.zeros(2, dtype=torch.float64)"
                       ".to(device)\n```\n", encoding="utf-8")
    assert [line for line, _ in float64_on_device(chapter)] == [12]


@pytest.mark.parametrize("chapter", sorted(BOOK.glob("*.md")), ids=lambda p: p.stem)
def test_no_chapter_sends_float64_to_the_device(chapter):
    """Every chapter runs on CPU, CUDA and MPS: float64 stays on the CPU (MPS has none)."""
    found = float64_on_device(chapter)
    assert not found, (f"{chapter.name} puts float64 on the device (MPS has no float64): "
                       + "; ".join(f"line {line}: {code}" for line, code in found)
                       + ". Keep float64 work on the CPU: create float64 tensors without "
                       "device=, and cast to float32 before .to(device).")
