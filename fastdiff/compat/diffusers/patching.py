"""What every ``accelerate`` patch shares: how a patch says which class it replaces and which versions of that
class's code it was checked against, the structure checks, and the install/undo of a forward by instance.

A patch is one small class, named after the diffusers class it replaces (``ResnetBlock2DPatch``):

- ``target``: that class. Instances of exactly this class are patched; an instance of a subclass is left
  alone and reported (a subclass may override what the patch relies on).
- ``checked``: ``{method name: {digest: "diffusers versions"}}``, the digests (:func:`code_digest`) of the
  methods whose behaviour the patch reproduces, for every diffusers release it was checked against. A
  method whose code is not one of them (a diffusers release changed it) makes the patch skip the module
  with that reason, so a new diffusers release never runs a stale patch silently.
- ``check(module)``: the structure the patch needs (submodule types, no hooks it would bypass, ...): None
  when the patch applies, else the reason it does not.
- ``apply(module)``: install the patch and return the callable that undoes it exactly.

Patches change instances only: a forward is swapped by setting the instance attribute ``forward``
(:func:`swap_forward`, undone by deleting it), so the class, the module tree, the parameters and the
``state_dict`` keys stay what they were.

Adding a patch (for example a diffusion transformer's block): write the fused forward as a function of the
module (``def basic_transformer_block_forward(self, hidden_states, ...)``) that calls the same submodules in
the same order as the diffusers forward it mirrors, except where it fuses; a ``ModulePatch`` subclass named
after the class (``BasicTransformerBlockPatch``) with ``target``, ``checked`` (digests from
:func:`code_digest` of that forward, for the releases read; :func:`node_digest` computes them from a release's
source file), ``check_structure`` (the submodule types and attributes the fused forward assumes, hooks it
bypasses: return the reason when they do not hold) and ``forward_fn`` (the fused forward, which ``apply``
installs with ``swap_forward``), or its own ``apply`` returning the undo (a processor swap: :func:`swap_processor`);
then add an instance to the tuple ``accelerate._patches()`` returns (a module ``patches_transformer.py`` with
``TRANSFORMER_PATCHES``, as ``patches_unet.UNET_PATCHES``). The tests compare the patched model with the unpatched
one in float32 and check the report and the undo.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import textwrap
import types
from typing import Callable, Optional

from torch import nn

__all__ = ["ModulePatch", "code_digest", "node_digest", "swap_forward", "swap_processor", "hooks_on", "pair_fusable",
           "identity_forward"]


def code_digest(fn) -> str:
    """A digest of a function's code that ignores formatting, comments, the docstring, decorators and type
    annotations: two releases that differ only in those share a digest."""
    return node_digest(ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0])


def node_digest(node: ast.FunctionDef) -> str:
    """:func:`code_digest` of a parsed function (also used to check a diffusers release's source file)."""
    node.decorator_list = []
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        node.body = body[1:] or [ast.Pass()]
    node.returns = None
    for arg in ast.walk(node.args):
        if isinstance(arg, ast.arg):
            arg.annotation = None
    return hashlib.sha256(ast.dump(node).encode()).hexdigest()[:16]


def hooks_on(*modules: nn.Module) -> list[str]:
    """Names of the module hooks registered on ``modules`` (hooks a fused forward would not run)."""
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [f"{type(m).__name__}.{k.strip('_')}" for m in modules for k in kinds if getattr(m, k, None)]


def swap_forward(module: nn.Module, fn: Callable) -> Callable[[], None]:
    """Make ``fn(module, ...)`` the instance's forward; returns the undo (which deletes the attribute)."""
    if "forward" in module.__dict__:
        raise RuntimeError(f"{type(module).__name__} already has an instance forward")
    module.forward = types.MethodType(fn, module)

    def undo():
        module.__dict__.pop("forward", None)

    return undo


def identity_forward(self, x):
    """The forward of an activation whose work a fused norm has already done."""
    return x


def _self_attr(node: ast.AST) -> Optional[str]:
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
        return node.attr
    return None


def _assign_call(stmt: ast.stmt, attr: str) -> Optional[str]:
    """``V = self.<attr>(V, ...)`` -> "V", else None."""
    if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
        return None
    call = stmt.value
    if not (isinstance(call, ast.Call) and _self_attr(call.func) == attr and call.args):
        return None
    var = stmt.targets[0].id
    first = call.args[0]
    return var if isinstance(first, ast.Name) and first.id == var else None


def pair_fusable(fn, norm: str, act: str) -> Optional[str]:
    """Whether ``fn`` (a method's code) applies ``self.<act>`` only right after ``self.<norm>``.

    True when ``self.<act>`` is called exactly once, as ``V = self.<act>(V)``, the statement before it is
    ``V = self.<norm>(V)`` (or an ``if`` whose branches both end so), ``self.<norm>`` is called nowhere else,
    and neither is otherwise used except in an ``if`` test. Then the norm may return ``act(norm(x))`` and the
    activation pass its input through. Returns None when fusable, else the reason.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    calls = {norm: [], act: []}
    for node in ast.walk(tree):
        attr = _self_attr(node)
        if attr not in calls:
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Call) and parent.func is node:
            calls[attr].append(parents.get(parent))
            continue
        up = node
        while up in parents and not isinstance(parents[up], ast.stmt):
            up = parents[up]
        stmt = parents.get(up)
        if not (isinstance(stmt, ast.If) and up is stmt.test):
            return f"self.{attr} is used other than called (line {node.lineno} of {fn.__qualname__})"
    if len(calls[act]) != 1:
        return f"self.{act} is called {len(calls[act])} times in {fn.__qualname__} (expected once)"
    stmt = calls[act][0]
    var = _assign_call(stmt, act) if stmt is not None else None
    if var is None or len(stmt.value.args) != 1 or stmt.value.keywords:
        return f"self.{act} is not called as `x = self.{act}(x)` in {fn.__qualname__}"
    block = next((getattr(p, f) for p in ast.walk(tree) for f in ("body", "orelse")
                  if isinstance(getattr(p, f, None), list) and stmt in getattr(p, f)), None)
    prev = block[block.index(stmt) - 1] if block and block.index(stmt) > 0 else None
    if prev is not None and _assign_call(prev, norm) == var:
        expected = [prev]
    elif isinstance(prev, ast.If) and prev.orelse and all(_assign_call(b[-1], norm) == var
                                                          for b in (prev.body, prev.orelse)):
        expected = [prev.body[-1], prev.orelse[-1]]
    else:
        return f"self.{act} does not directly follow self.{norm} in {fn.__qualname__}"
    if sorted(map(id, calls[norm])) != sorted(map(id, expected)):
        return f"self.{norm} is called elsewhere in {fn.__qualname__}"
    return None


class ModulePatch:
    """Base of every patch (see the module docstring). Subclasses set ``target`` and ``checked``, implement
    :meth:`check_structure`, and either set ``forward_fn`` (the fused forward :meth:`apply` installs with
    :func:`swap_forward`) or implement :meth:`apply`; the report lists a patch under :attr:`name`."""

    target: type = None
    checked: dict = {}
    forward_fn: Optional[Callable] = None

    @property
    def name(self) -> str:
        return self.target.__name__

    def matches(self, module: nn.Module) -> bool:
        """Whether the patch is about this module (its target class or a subclass of it)."""
        return isinstance(module, self.target)

    def check(self, module: nn.Module) -> Optional[str]:
        """None when the patch applies to ``module``, else the reason it does not (and nothing is changed)."""
        if type(module) is not self.target:
            return (f"{type(module).__name__} is a subclass of {self.target.__name__}; its code may differ from "
                    "what the patch was checked against")
        if "forward" in module.__dict__:
            return "the instance's forward was replaced (by another tool or an earlier patch)"
        for method, digests in self.checked.items():
            reason = self._code_mismatch(getattr(type(module), method), digests)
            if reason:
                return reason
        return self.check_structure(module)

    @staticmethod
    def _code_mismatch(fn, digests: dict) -> Optional[str]:
        try:
            got = code_digest(fn)
        except (OSError, TypeError, SyntaxError) as e:  # no source (a frozen or compiled install)
            return f"the code of {fn.__qualname__} cannot be read ({e})"
        if got in digests:
            return None
        import diffusers

        versions = ", ".join(sorted(set(digests.values())))
        return (f"{fn.__qualname__} of diffusers {diffusers.__version__} differs from the code this patch was "
                f"checked against (diffusers {versions}; digest {got})")

    def check_structure(self, module: nn.Module) -> Optional[str]:
        return None

    def apply(self, module: nn.Module) -> Callable[[], None]:
        if type(self).forward_fn is None:
            raise NotImplementedError(f"{type(self).__name__} sets no forward_fn and does not implement apply")
        return swap_forward(module, type(self).forward_fn)


def swap_processor(attn: nn.Module, processor) -> Callable[[], None]:
    """Make ``processor`` the attention module's processor; returns the undo (which puts the original back)."""
    original = attn.processor
    attn.processor = processor

    def undo():
        attn.processor = original

    return undo
