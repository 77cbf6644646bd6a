"""Quantization rules over Flax module paths: which layers of a model are quantized, and how.

A :class:`QuantRule` names layers by a regular expression that must match the whole
``/``-joined module path (as in the parameter tree: ``"features_3/depthwise"``, ``"Conv_0"``,
``"block1/conv"``). Rules form an ordered list; for each quantization site the **first**
matching rule decides, and a site that no rule matches stays in floating point.

Sites are of three kinds (see :mod:`oscqat_jax.nn.intercept` for how they are found):

- **layers** (``nn.Conv``, ``nn.Dense``, ...): the rule's ``weight_bits`` quantize the kernel
  and its ``act_bits`` the layer's *input* (the paper's ``LSQ_paper`` placement);
- **conv + BatchNorm** (:class:`~oscqat_jax.nn.convbn.ConvBN`): as a layer (its conv's
  kernel and its input), with BN folded into the quantized kernel when the rule says
  ``fold_bn=True``;
- **activation hooks** (:class:`~oscqat_jax.nn.intercept.ActQuant`, an identity module the
  user places where a value should be quantized: after BN and the activation, after a
  residual add, on the logits): the rule's ``output_bits`` quantize the value there.

Layers ignore ``output_bits``: in a plain Flax model a conv's own output still goes through
BatchNorm, the activation or a residual add before anything reads it, so the place where the
paper quantizes an "output" is never a conv call and only a hook can mark it.

:func:`paper_rules` writes the paper's setups (docs/method.md §4) as rule lists, built from the
same table as :meth:`oscqat_jax.nn.setups.QuantSetup.layer_quant`, so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from oscqat_jax._checks import MAX_BITS, check_n_bits
from oscqat_jax.nn.config import FLOAT, RANGE_METHODS, LayerQuant, QuantizerSpec
from oscqat_jax.nn.setups import SETUPS, QuantSetup

SITE_COUNTS = ("some", "one", "any")
"""Values of :attr:`QuantRule.sites`: how many of a model's sites a rule's pattern must match
(at least one, exactly one, any number). A rule is checked against every site its pattern and
depth-wise filter match, whether or not an earlier rule takes the site."""


@functools.cache
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def check_pattern(pattern, name: str) -> None:
    """Raises, in one sentence naming ``name``, unless ``pattern`` is a string that compiles as
    a regular expression (Python's ``re`` refuses some with ``OverflowError`` or
    ``RecursionError`` rather than ``re.error``: a repeat count too large, deep nesting)."""
    if not isinstance(pattern, str):
        raise ValueError(f"{name} must be a regular expression string, got {pattern!r}.")
    try:
        _compiled(pattern)
    except (re.error, OverflowError, RecursionError) as err:
        reason = str(err).splitlines()[0].rstrip(".") if str(err) else type(err).__name__
        raise ValueError(
            f"{name} {pattern!r} is not a valid regular expression ({reason})."
        ) from None


def _check_bits(value, name: str) -> None:
    if value is not None:
        check_n_bits(value, name)


def _check_bool(value, name: str, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, bool):
        allowed = "True, False or None" if optional else "True or False"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How the sites whose module path matches ``module_path`` are quantized.

    Bit widths are ints in 2..16 or None (that tensor stays float32).
    """

    module_path: str = ".*"  # regex, re.fullmatch against the '/'-joined module path
    weight_bits: int | None = 4  # a layer's kernel (signed grid)
    act_bits: int | None = 4  # a layer's input activation (signedness learnt at calibration)
    output_bits: int | None = None  # the value at an ActQuant hook; layers ignore it
    depthwise: bool | None = None  # None: any site; True: only depth-wise convs; False: all but
    per_channel: bool = False  # one weight scale per output channel (last kernel axis)
    weight_symmetric: bool = True  # weights on a symmetric grid (else a learnt zero point)
    act_symmetric: bool = True  # activations on a symmetric grid (else unsigned + zero point)
    weight_range_method: str = "mse"  # initial weight range: "mse", "current_minmax", ...
    act_range_method: str = "mse"  # initial activation range
    grad_scale: bool = False  # LSQ gradient scaling of the scales (off in the reference)
    track: bool = True  # track oscillations and allow freezing (weights of <= max_bits bits)
    dampen: bool = True  # add this kernel's dampening term to the loss (train mode)
    max_bits: int = 4  # widest weight that is tracked and frozen (the paper: 4)
    sites: str = "some"  # sites the pattern must match: "some" (>= 1), "one" or "any" (>= 0)
    fold_bn: bool = False  # ConvBN sites: fold BN into the quantized kernel (others ignore it)

    def __post_init__(self):
        check_pattern(self.module_path, "module_path")
        for name in ("weight_bits", "act_bits", "output_bits"):
            _check_bits(getattr(self, name), name)
        _check_bool(self.depthwise, "depthwise", optional=True)
        for name in ("per_channel", "weight_symmetric", "act_symmetric", "grad_scale"):
            _check_bool(getattr(self, name), name)
        _check_bool(self.track, "track")
        _check_bool(self.fold_bn, "fold_bn")
        _check_bool(self.dampen, "dampen")
        for name in ("weight_range_method", "act_range_method"):
            if getattr(self, name) not in RANGE_METHODS:
                raise ValueError(
                    f"{name} must be one of {', '.join(RANGE_METHODS)}, "
                    f"got {getattr(self, name)!r}."
                )
        if self.sites not in SITE_COUNTS:
            raise ValueError(f"sites must be one of {', '.join(SITE_COUNTS)}, got {self.sites!r}.")
        if isinstance(self.max_bits, bool) or not isinstance(self.max_bits, numbers.Integral):
            raise ValueError(
                f"max_bits must be an int between 0 and {MAX_BITS}, got {self.max_bits!r}."
            )
        if not 0 <= self.max_bits <= MAX_BITS:
            raise ValueError(f"max_bits must be between 0 and {MAX_BITS}, got {self.max_bits}.")

    def matches(self, path: str, *, depthwise: bool = False) -> bool:
        """Whether this rule applies to the site at module ``path`` (a depth-wise conv or not)."""
        if self.depthwise is not None and self.depthwise != depthwise:
            return False
        return _compiled(self.module_path).fullmatch(path) is not None

    def layer_quant(self) -> LayerQuant:
        """The rule as a :class:`~oscqat_jax.nn.config.LayerQuant`: ``weight`` and ``input``
        for layers, ``output`` for activation hooks."""
        weight = _spec(
            self.weight_bits,
            self.weight_symmetric,
            self.weight_range_method,
            self.grad_scale,
            per_channel=self.per_channel,
        )
        return LayerQuant(
            weight=weight,
            input=_spec(self.act_bits, self.act_symmetric, self.act_range_method, self.grad_scale),
            output=_spec(
                self.output_bits, self.act_symmetric, self.act_range_method, self.grad_scale
            ),
            track_oscillations=self.track and weight.enabled and weight.n_bits <= self.max_bits,
            dampen=self.dampen,
        )


def _spec(n_bits, symmetric, range_method, grad_scale, *, per_channel=False) -> QuantizerSpec:
    if n_bits is None:
        return FLOAT
    return QuantizerSpec(
        n_bits=n_bits,
        symmetric=symmetric,
        per_channel=per_channel,
        range_method=range_method,
        grad_scale=grad_scale,
    )


def check_rules(rules: Iterable[QuantRule]) -> tuple[QuantRule, ...]:
    """``rules`` as a tuple; raises if it is not a sequence or an entry is not a
    :class:`QuantRule`."""
    if isinstance(rules, QuantRule):
        raise ValueError(
            "rules must be a sequence of QuantRule, got a single QuantRule; wrap it in a list."
        )
    if isinstance(rules, (str, bytes, Mapping)) or not isinstance(rules, Iterable):
        raise ValueError(
            f"rules must be a sequence of QuantRule (e.g. from paper_rules), got "
            f"{type(rules).__name__}."
        )
    rules = tuple(rules)
    for i, rule in enumerate(rules):
        if not isinstance(rule, QuantRule):
            raise ValueError(f"rules[{i}] must be a QuantRule, got {type(rule).__name__}.")
    return rules


@dataclasses.dataclass(frozen=True)
class SitePlan(LayerQuant):
    """How one site is quantized (the :class:`~oscqat_jax.nn.config.LayerQuant` fields), and
    why: the site's ``kind`` (``layer``, ``conv_bn`` or ``hook``), whether it is a depth-wise conv, and
    the first rule that matched it. Layers report ``weight``/``input``, hooks ``output``."""

    kind: str = "layer"
    depthwise: bool = False
    rule: QuantRule | None = None


def site_plan(rules: Sequence[QuantRule], site: Site) -> SitePlan:
    """What ``rules`` do to ``site`` (a plan entry; not quantized when no rule matches)."""
    rule = find_rule(rules, site.path, depthwise=site.depthwise)
    if site.kind == "hook":
        quant = LayerQuant(output=hook_site_quant(rules, site.path))
    else:
        quant = layer_site_quant(rules, site.path, depthwise=site.depthwise)
    fields = {f.name: getattr(quant, f.name) for f in dataclasses.fields(LayerQuant)}
    return SitePlan(**fields, kind=site.kind, depthwise=site.depthwise, rule=rule)


class Site(NamedTuple):
    """A place in a model that rules can quantize: a conv/dense ``layer``, a conv + BatchNorm
    (``conv_bn``) or an activation ``hook``, at ``path``, and whether it is a depth-wise conv."""

    path: str
    kind: str
    depthwise: bool = False


def check_coverage(rules: Sequence[QuantRule], sites: Sequence[Site]) -> None:
    """Raises, in one sentence, when the rules do not fit the model's sites: a rule that must
    match some site (``sites="some"``, the default) or exactly one (``"one"``) but does not,
    or a rule list that quantizes nothing at all."""
    sites = list(dict.fromkeys(sites))
    known = ", ".join(f"{s.path} ({s.kind}{', depth-wise' if s.depthwise else ''})" for s in sites)
    for index, rule in enumerate(rules):
        matched = [s.path for s in sites if rule.matches(s.path, depthwise=s.depthwise)]
        what = f"rules[{index}] (module_path {rule.module_path!r}"
        what += "" if rule.depthwise is None else f", depthwise={rule.depthwise}"
        what += ")"
        if rule.sites != "any" and not matched:
            raise ValueError(
                f"{what} matches no site of the model; its sites are: {known or 'none'}. "
                "Fix the pattern, or give the rule sites='any' if it may match nothing."
            )
        if rule.sites == "one" and len(matched) > 1:
            raise ValueError(
                f"{what} is meant for one layer but matches {len(matched)}: "
                f"{', '.join(matched)}; make the pattern match only the intended one."
            )
    if rules and not any(site_plan(rules, s).quantized for s in sites):
        raise ValueError(
            f"No rule quantizes any site of the model; its sites are: {known or 'none'}."
        )


def find_rule(
    rules: Sequence[QuantRule], path: str, *, depthwise: bool = False
) -> QuantRule | None:
    """The first rule of ``rules`` that matches the site at ``path``; None if none does."""
    for rule in rules:
        if rule.matches(path, depthwise=depthwise):
            return rule
    return None


def layer_site_quant(rules: Sequence[QuantRule], path: str, *, depthwise: bool) -> LayerQuant:
    """What the rules do to the conv/dense layer at ``path``: its kernel and input quantizers
    (``output`` is always float for a layer; see the module docstring)."""
    rule = find_rule(rules, path, depthwise=depthwise)
    if rule is None:
        return LayerQuant()
    return dataclasses.replace(rule.layer_quant(), output=FLOAT)


def hook_site_quant(rules: Sequence[QuantRule], path: str) -> QuantizerSpec:
    """The quantizer the rules put at the activation hook at ``path`` (FLOAT when none)."""
    rule = find_rule(rules, path)
    return FLOAT if rule is None else rule.layer_quant().output


def paper_rules(
    setup: str = "LSQ_paper",
    n_bits: int = 4,
    n_bits_act: int | None = None,
    *,
    first_conv: str,
    classifier: str,
    head_output: str | None = None,
    logits: str | None = None,
    per_channel: bool = False,
    weight_range_method: str = "mse",
    act_range_method: str = "mse",
    weight_symmetric: bool = True,
    act_symmetric: bool = True,
    grad_scale: bool = False,
    max_bits: int = 4,
    fold_bn: bool = False,
) -> tuple[QuantRule, ...]:
    """The paper's quant ``setup`` (docs/method.md §4; one of ``setups.SETUPS``) as an ordered
    rule list.

    Args:
      setup: ``LSQ_paper`` (inputs of weight layers quantized; fully expressed by layers),
        or an output-quantizing setup (``all``, ``FP_logits``, ``LSQ``, ``fc4``, ``fc4_dw8``),
        whose activations are quantized at the model's :class:`ActQuant` hooks: one after each
        conv's BN and activation, one after each residual add, one after pooling and, for
        quantized logits, one after the classifier. ``float`` gives no rules.
      n_bits, n_bits_act: weight and activation bit widths of the inner layers
        (``n_bits_act=None``: ``n_bits``).
      first_conv: regex of the stem conv's path (image input stays float; weights at 8 bits
        in every setup but ``all``/``FP_logits``).
      classifier: regex of the last dense layer's path.
      head_output: regex of the hooks whose values feed the global pooling (after the last
        conv, after the last residual add) and of the hook after pooling; the ``LSQ`` setup
        quantizes them at 8 bits and needs it.
      logits: regex of the hook after the classifier, when the model has one; the setups
        with float logits (``LSQ``, ``FP_logits``) keep it float.
      per_channel ... max_bits: as the fields of :class:`QuantRule` (and of ``QuantSetup``).
      fold_bn: fold BatchNorm into the quantized kernels of the ConvBN sites.

    Returns:
      Rules ordered classifier, first conv, hooks named above, depth-wise convs, then
      every other site (``.*``). Put your own rules in front to override any of them.
    """
    if setup not in SETUPS:
        raise ValueError(f"setup must be one of {', '.join(SETUPS)}, got {setup!r}.")
    check_pattern(first_conv, "first_conv")
    check_pattern(classifier, "classifier")
    for name, pattern in (("head_output", head_output), ("logits", logits)):
        if pattern is not None:
            check_pattern(pattern, name)
    quant_setup = QuantSetup(
        name=setup,
        n_bits=n_bits,
        n_bits_act=n_bits_act,
        per_channel=per_channel,
        weight_range_method=weight_range_method,
        act_range_method=act_range_method,
        weight_symmetric=weight_symmetric,
        act_symmetric=act_symmetric,
        grad_scale=grad_scale,
        max_bits=max_bits,
    )
    if setup == "float":
        return ()
    if setup == "LSQ" and head_output is None:
        raise ValueError(
            "setup 'LSQ' quantizes the activations that feed the pooling at 8 bits; pass "
            "head_output=<regex of the ActQuant hooks there>."
        )
    common = dict(
        per_channel=per_channel,
        weight_symmetric=weight_symmetric,
        act_symmetric=act_symmetric,
        weight_range_method=weight_range_method,
        act_range_method=act_range_method,
        grad_scale=grad_scale,
        max_bits=max_bits,
        fold_bn=fold_bn,
    )

    def rule(pattern: str, role: str, **kwargs) -> QuantRule:
        site = quant_setup.layer_quant("", role)
        return QuantRule(
            pattern,
            weight_bits=site.weight.n_bits,
            act_bits=site.input.n_bits,
            output_bits=site.output.n_bits,
            **kwargs,
            **common,
        )

    def hook(pattern: str, role: str) -> QuantRule:
        bits = quant_setup.layer_quant("", role).output.n_bits
        return QuantRule(pattern, weight_bits=None, act_bits=None, output_bits=bits, **common)

    # The stem and the classifier are one layer each: a pattern that misses, or that also
    # takes other layers, is a mistake the first call reports (QuantRule.sites).
    rules = [
        rule(classifier, "classifier", sites="one"),
        rule(first_conv, "first_conv", sites="one"),
    ]
    if logits is not None:
        rules.append(hook(logits, "classifier"))
    if head_output is not None:
        rules.append(hook(head_output, "head"))
    rules.append(rule(".*", "depthwise", depthwise=True, sites="any"))
    # The inner convs and every remaining hook (conv outputs, residual adds): the `conv` and
    # `residual` roles have the same output bits in every setup (tests/nn/test_rules.py).
    rules.append(rule(".*", "conv", sites="any"))
    return tuple(rules)


__all__ = [
    "SETUPS",
    "QuantRule",
    "SITE_COUNTS",
    "Site",
    "SitePlan",
    "site_plan",
    "check_coverage",
    "check_rules",
    "find_rule",
    "hook_site_quant",
    "layer_site_quant",
    "paper_rules",
]
