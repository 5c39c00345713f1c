"""The error model, fully used: one class per refusal, unique names, templates that format.

``errors.py`` makes each class's docstring its message template and its exit
code the promise of how much changed. That only helps if every refusal has
its own class (a caller or a test reads ``exc.fields``, not the text), if a
kind names one class (errors cross the agent's socket and the mailboxes by
class name), and if each raise passes the fields its template needs. These
tests read the source of every module in ``src/`` and hold all three.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import fenceless
from fenceless import errors
from fenceless.errors import FencelessError, from_wire, to_wire
from fenceless.ops.journal import ReusedRequestId
from fenceless.ops.volume import VolumeExists

SRC = Path(__file__).resolve().parents[2] / "src"


def package_modules() -> dict[str, ModuleType]:
    """Every module of the package, imported (so every error class is defined)."""
    mods = {"fenceless": fenceless}
    for info in pkgutil.walk_packages(fenceless.__path__, "fenceless."):
        mods[info.name] = importlib.import_module(info.name)
    return mods


def error_classes() -> list[type[FencelessError]]:
    """FencelessError and every subclass of it that the package defines."""
    package_modules()
    found: list[type[FencelessError]] = [FencelessError]
    todo = [FencelessError]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                todo.append(sub)
                if sub.__module__.split(".")[0] == "fenceless":
                    found.append(sub)
    return found


def generic_classes() -> set[type[FencelessError]]:
    """The classes whose template is just ``{detail}``: bases to catch, never to raise."""
    return {c for c in error_classes() if c.template() == "{detail}"}


def template_fields(template: str) -> set[str]:
    """The names a template formats; ValueError if it does not parse as a format string."""
    names = set()
    for _text, field, _spec, _conv in string.Formatter().parse(template):
        if field is None:
            continue
        name = field.split(".")[0].split("[")[0]
        if not name.isidentifier():
            raise ValueError(f"field {field!r} is not a keyword (errors take keywords only)")
        names.add(name)
    return names


# --- reading the source ------------------------------------------------------------


def _imported_names(tree: ast.AST, module: ModuleType) -> dict[str, Any]:
    """What each import of the package binds in the file, wherever it is (also in a
    function, where the module's globals do not show it)."""
    bound: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "fenceless":
                    continue
                if alias.asname:
                    bound[alias.asname] = importlib.import_module(alias.name)
                else:
                    importlib.import_module(alias.name)
                    bound["fenceless"] = fenceless
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                # from the package the module is in (a package's __init__ is in itself)
                package = (module.__package__ or "").split(".")
                parts = package[: len(package) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            if base.split(".")[0] != "fenceless":
                continue
            source = importlib.import_module(base)
            for alias in node.names:
                value = getattr(source, alias.name, None)
                if value is None:
                    value = importlib.import_module(f"{base}.{alias.name}")
                bound[alias.asname or alias.name] = value
    return bound


def _resolve(expr: ast.expr, names: dict[str, Any]) -> Any:
    """The object a name or a dotted name stands for in the module, if it is known."""
    if isinstance(expr, ast.Name):
        return names.get(expr.id)
    if isinstance(expr, ast.Attribute):
        base = _resolve(expr.value, names)
        return None if base is None else getattr(base, expr.attr, None)
    return None


def error_calls(path: Path, module: ModuleType) -> Iterator[tuple[int, type, ast.AST]]:
    """(line, class, node) of every call of an error class in the file, and every
    ``raise X`` of one without a call (which calls it with no fields)."""
    tree = ast.parse(path.read_text(), str(path))
    names = {**vars(module), **_imported_names(tree, module)}
    for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
        target: ast.expr | None = None
        if isinstance(node, ast.Call):
            target = node.func
        elif isinstance(node, ast.Raise) and node.exc is not None and \
                not isinstance(node.exc, ast.Call):
            target = node.exc
        if target is None:
            continue
        obj = _resolve(target, names)
        if isinstance(obj, type) and issubclass(obj, FencelessError):
            yield node.lineno, obj, node


def all_error_calls() -> Iterator[tuple[str, int, type, ast.AST]]:
    for module in package_modules().values():
        path = Path(module.__file__ or "")
        yield from ((f"{path.relative_to(SRC)}", line, cls, node)
                    for line, cls, node in error_calls(path, module))


# --- the rules ------------------------------------------------------------------------


def test_the_generic_classes_are_the_bases() -> None:
    generic = {c.__name__ for c in generic_classes()}
    assert {"FencelessError", "UserError", "ExecError", "IntegrityError",
            "LeaseLost"} <= generic


def test_no_generic_class_is_raised_anywhere() -> None:
    """Every refusal has a class of its own: no ``raise UserError(detail=...)``."""
    generic = generic_classes()
    found = [f"{where}:{line}: {cls.__name__}(...)"
             for where, line, cls, _node in all_error_calls() if cls in generic]
    assert not found, "give each of these a class of its own:\n" + "\n".join(found)


def test_error_class_names_are_unique() -> None:
    """Errors cross the agent's socket and the mailboxes by class name."""
    seen: dict[str, str] = {}
    twice = []
    for cls in error_classes():
        where = f"{cls.__module__}.{cls.__qualname__}"
        if cls.__name__ in seen:
            twice.append(f"{seen[cls.__name__]} and {where}")
        seen[cls.__name__] = where
    assert not twice, "one name, two classes: " + "; ".join(twice)


def test_every_class_is_registered_under_its_name() -> None:
    for cls in error_classes():
        assert errors._REGISTRY[cls.__name__] is cls


@pytest.mark.parametrize("cls", error_classes(), ids=lambda c: c.__name__)
def test_template_parses(cls: type[FencelessError]) -> None:
    template_fields(cls.template())


def test_every_raise_passes_the_fields_its_template_needs() -> None:
    """A raise that forgets a field would print the raw template: caught here instead."""
    wrong = []
    for where, line, cls, node in all_error_calls():
        if not isinstance(node, ast.Call):
            given: set[str] = set()
        elif node.args or any(k.arg is None for k in node.keywords):
            continue  # positional (a custom __init__) or **fields: cannot be read statically
        else:
            given = {k.arg for k in node.keywords if k.arg is not None}
        missing = template_fields(cls.template()) - given
        if missing:
            wrong.append(f"{where}:{line}: {cls.__name__} misses {sorted(missing)}")
    assert not wrong, "\n".join(wrong)


def test_the_scan_finds_what_it_is_for(tmp_path: Path) -> None:
    """The scan itself, on a made-up module that raises generic classes four ways."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from fenceless.errors import UserError as Refused\n"
        "from fenceless import errors as e\n"
        "import fenceless.errors\n"
        "from fenceless.ops.volume import VolumeExists\n"
        "def f(x):\n"
        "    import fenceless.errors as inner\n"
        "    if x == 1:\n"
        "        raise Refused(detail='a')\n"
        "    if x == 2:\n"
        "        raise e.ExecError(detail='b')\n"
        "    if x == 3:\n"
        "        return fenceless.errors.LeaseLost(detail='c')\n"
        "    if x == 4:\n"
        "        raise inner.IntegrityError\n"
        "    raise VolumeExists(name='n', vg='v')\n")
    module = ModuleType("mod")
    exec(compile(source.read_text(), str(source), "exec"), vars(module))
    found = [(line, cls.__name__) for line, cls, _ in error_calls(source, module)]
    assert found == [(8, "UserError"), (10, "ExecError"), (12, "LeaseLost"),
                     (14, "IntegrityError"), (15, "VolumeExists")]
    assert template_fields(VolumeExists.template()) == {"name", "vg", "size"}


# --- the wire ---------------------------------------------------------------------------


def test_to_wire_is_json_and_from_wire_gives_the_class_back() -> None:
    exc = VolumeExists(name="web", vg="sanvg", size="1.00 GiB")
    wire = to_wire(exc)
    assert wire == {"kind": "VolumeExists", "module": "fenceless.ops.volume",
                    "fields": {"name": "web", "vg": "sanvg", "size": "1.00 GiB"},
                    "message": exc.message, "code": 2}
    back = from_wire(wire)
    assert type(back) is VolumeExists and back.exit_code == 2
    assert back.fields["name"] == "web" and str(back) == str(exc)


def test_fields_are_made_json_safe_and_the_message_is_the_senders() -> None:
    exc = ReusedRequestId(id="r1", op="create", args=(1, Path("/x"), {"k": {2, 1}}))
    wire = to_wire(exc)
    assert wire["fields"]["args"] == [1, "/x", {"k": [1, 2]}]
    back = from_wire(wire)
    assert str(back) == str(exc)  # "(1, PosixPath('/x'), ...)": as the sender printed it
    assert back.fields["args"] == [1, "/x", {"k": [1, 2]}]


def test_a_template_that_does_not_format_keeps_the_sent_message() -> None:
    wire = {"kind": "VolumeExists", "fields": {"renamed": 1}, "message": "as sent", "code": 2}
    back = from_wire(wire)
    assert type(back).__name__ == "VolumeExists" and str(back) == "as sent"


def test_unknown_kinds_and_garbage_are_remote_errors() -> None:
    back = from_wire({"kind": "FromTheFuture", "message": "new", "code": 5})
    assert isinstance(back, errors.RemoteError)
    assert (str(back), back.exit_code, back.fields["kind"]) == ("new", 5, "FromTheFuture")
    for junk in (None, [], {"kind": 3, "code": "x", "fields": [1]}, {"code": True},
                 {"kind": "NoSuchClass", "code": 999}):
        got = from_wire(junk, default_code=3)
        assert isinstance(got, errors.RemoteError) and got.exit_code == 3


def test_old_records_without_fields_still_read() -> None:
    """What the writer recorded before errors carried their fields."""
    back = from_wire({"message": "not found", "code": 2, "kind": "NotFound"})
    assert isinstance(back, errors.NotFound) and str(back) == "not found"
    assert back.exit_code == 2


def test_only_the_socket_imports_a_module_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data from the disk never makes this process import anything."""
    imported: list[str] = []

    def fake_import(name: str) -> ModuleType:
        imported.append(name)
        raise ImportError(name)

    monkeypatch.setattr(errors.importlib, "import_module", fake_import)
    wire = {"kind": "Unheard", "module": "fenceless.not_loaded_yet", "message": "m", "code": 2}
    assert isinstance(from_wire(wire), errors.RemoteError)
    assert imported == []
    assert isinstance(from_wire(wire, load=True), errors.RemoteError)
    assert imported == ["fenceless.not_loaded_yet"]
    for module in ("os", "fenceless", "fenceless.x;y", "fenceless..x", "xfenceless.y"):
        from_wire({**wire, "module": module}, load=True)
    assert imported == ["fenceless.not_loaded_yet"]


def test_the_socket_side_imports_the_class_module_it_lacks() -> None:
    """A CLI that never imported ``ops.volume`` still raises ``VolumeExists`` from the agent."""
    code = (
        "import sys\n"
        "from fenceless.errors import from_wire\n"
        "assert 'fenceless.ops.volume' not in sys.modules\n"
        "wire = {'kind': 'VolumeExists', 'module': 'fenceless.ops.volume', 'code': 2,\n"
        "        'message': 'm', 'fields': {'name': 'web'}}\n"
        "print(type(from_wire(wire)).__name__, type(from_wire(wire, load=True)).__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["RemoteError", "fenceless.ops.volume"]
