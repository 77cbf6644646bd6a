"""A :class:`~oscqat_jax.nn.setups.QuantSetup` as a rule list: one path language for every model.

A model quantized by rules declares where its paper roles are (:class:`ModelSites`: the stem
conv, the classifier, the hooks feeding the pooling, the logits hook); :func:`setup_rules`
turns a setup (its name, bit widths, per-channel, range methods, grid symmetry, LSQ gradient
scaling, ``max_bits`` and overrides) into the ordered rules of
:func:`~oscqat_jax.nn.rules.paper_rules` for those sites.

Overrides ``(glob, weight_bits, act_bits)`` become rules in front: for each override, in
order, a copy of every rule so far restricted to the paths the glob matches (``fnmatch``,
``*`` crossing ``/``, as ``QuantSetup``), with the override's bits; so later overrides win
and a site matching several gets each one's change, as :meth:`QuantSetup.layer_quant` does.
``act_bits`` changes the activation quantizer the setup uses at the site: the input of a
conv/dense in ``LSQ_paper``, the output at a hook in the other setups; ``"float"`` switches off
both. One difference from ``QuantSetup.layer_quant``'s table: there an integer ``act_bits``
under ``LSQ_paper`` also switches on the output quantizer of the ``residual`` role; here the
residual hooks stay as ``LSQ_paper`` leaves them (float).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import NamedTuple

from oscqat_jax.nn.rules import QuantRule, paper_rules
from oscqat_jax.nn.setups import FLOAT_BITS, QuantSetup


class ModelSites(NamedTuple):
    """Regexes (``re.fullmatch`` on ``/``-joined module paths) of a model's paper roles; see
    the arguments of :func:`~oscqat_jax.nn.rules.paper_rules`."""

    first_conv: str  # the stem conv (its input is the image)
    classifier: str  # the last dense layer
    head_output: str | None = None  # hooks on the activations that feed the pooling
    logits: str | None = None  # the hook after the classifier


def _restricted(rule: QuantRule, glob: str) -> str:
    """``rule``'s pattern, restricted to the paths ``glob`` (fnmatch) matches."""
    return f"(?={fnmatch.translate(glob)})(?:{rule.module_path})"


def _with_override(
    rules: tuple[QuantRule, ...], override: tuple, *, quantizes_inputs: bool
) -> tuple[QuantRule, ...]:
    glob, weight_bits, act_bits = override
    changes: dict = {}
    if weight_bits is not None:
        changes["weight_bits"] = None if weight_bits == FLOAT_BITS else weight_bits
    if act_bits == FLOAT_BITS:
        changes.update(act_bits=None, output_bits=None)
    elif act_bits is not None:
        changes["act_bits" if quantizes_inputs else "output_bits"] = act_bits
    copies = tuple(
        dataclasses.replace(rule, module_path=_restricted(rule, glob), sites="any", **changes)
        for rule in rules
    )
    return copies + rules


def setup_rules(
    setup: QuantSetup, sites: ModelSites, *, fold_bn: bool = False
) -> tuple[QuantRule, ...]:
    """The rules that quantize a model with ``sites`` as ``setup`` says (``float``: none).

    ``fold_bn``: fold BatchNorm into the quantized kernels of the model's ConvBN sites.
    """
    if not isinstance(setup, QuantSetup):
        raise ValueError(f"setup must be a QuantSetup, got {type(setup).__name__}.")
    rules = paper_rules(
        setup.name,
        setup.n_bits,
        setup.n_bits_act,
        first_conv=sites.first_conv,
        classifier=sites.classifier,
        head_output=sites.head_output,
        logits=sites.logits,
        per_channel=setup.per_channel,
        weight_range_method=setup.weight_range_method,
        act_range_method=setup.act_range_method,
        weight_symmetric=setup.weight_symmetric,
        act_symmetric=setup.act_symmetric,
        grad_scale=setup.grad_scale,
        max_bits=setup.max_bits,
        fold_bn=fold_bn,
    )
    for override in setup.overrides if rules else ():
        rules = _with_override(rules, override, quantizes_inputs=setup.quantizes_inputs)
    return rules


__all__ = ["ModelSites", "setup_rules"]
