"""The model of a config as the forward the steps call (:mod:`.forward`): one of the
package's models by name, or your own ``flax.linen`` model by import path; both are plain
Flax models quantized by rules (:class:`~oscqat_jax.training.forward.RulesForward`).

The package's models: ``config.model.name`` one of :data:`oscqat_jax.models.MODELS`,
built with ``model.width_multiplier``, ``block_setting`` and ``dtype`` and quantized by the
rules of ``config.quant`` (:func:`.build.quantized_model`, ``model.fold_bn`` folding BN into
the quantized kernels); ``model.pretrained`` is a PyTorch checkpoint (or a converted
``.npz``) that :mod:`oscqat_jax.convert` places into the plain model's variables.

Your own model: ``config.model.name = "package.module:make_model"`` names a function (or a
``flax.linen.Module`` class) that :func:`forward_of` calls with ``config.model.kwargs``, and
with ``num_classes=<the data's class count>`` when it takes that argument and the kwargs do not
set it; it must return an unbound ``flax.linen.Module`` that maps one float32 image batch
``(N, H, W, C)`` to logits ``(N, classes)``. Its keyword ``config.model.train_flag`` (Flax's
examples: ``train``) is True in train steps and False elsewhere; "" for a model without one.
The module is found on the Python path (``python train.py`` adds the current folder to it,
as ``python -m`` does, and its own folder holds ``demos/``).

A ``flax.nnx`` model: the function (or ``nnx.Module`` class) takes a keyword ``rngs`` and
returns an ``nnx.Module``; :func:`forward_of` checks it built abstractly (``nnx.eval_shape``
of a call with ``rngs=nnx.Rngs(0)``), and the training program builds the model it trains
with ``nnx.Rngs(key)``, ``key`` the run's ``jax.random.PRNGKey(config.seed)`` (as a Linen
model's ``init`` gets it). Its
``__call__`` takes the image batch; BatchNorm and dropout switch with ``model.train()`` /
``model.eval()``, so ``config.model.train_flag`` is "" unless the call also takes such a
keyword. It is quantized in place (:class:`~oscqat_jax.training.nnx_forward.NNXForward`).

Its rules: ``config.quant.setup`` (the paper's setups, :func:`oscqat_jax.nn.paper_rules`,
with ``quant.n_bits``, ``n_bits_act``, ``per_channel``, the range methods, ``grad_scale``,
``osc_freeze.max_bits``) over the layers that ``config.model.first_conv``, ``classifier``,
``head_output`` and ``logits`` name by regex; or ``config.quant.rules = "pkg.mod:make_rules"``,
a function called with ``config.quant.rules_kwargs`` that returns a list of
:class:`oscqat_jax.nn.QuantRule` (then the quant fields above are not read).

Everything that does not fit is refused at start-up, before any work, in one sentence: an
import path that does not import or names nothing, a result that is not a Flax module, a
call with more or fewer than one input, an input that is not an image batch, logits of the
wrong shape, rules that do not fit the model or quantize nothing, an NNX model whose
function takes no ``rngs``. A model without BatchNorm trains without BN re-estimation.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx, traverse_util

from oscqat_jax.nn import paper_rules, quantize_model
from oscqat_jax.training import build
from oscqat_jax.training.forward import Forward, RulesForward
from oscqat_jax.training.limits import is_import_path
from oscqat_jax.training.nnx_forward import NNXForward, pure_state


def forward_of(config: ml_collections.ConfigDict, source) -> Forward:
    """The forward of ``config.model`` for the data ``source`` (its class count and image
    shape); one sentence (ValueError) when an own model or its rules do not fit."""
    if not is_import_path(config.model.name):
        return package_forward(config, source.num_classes)
    model = _own_model(config, source.num_classes)
    flag = config.model.train_flag
    name = config.model.name
    images = jax.ShapeDtypeStruct((2, *source.image_shape), jnp.float32)
    if not isinstance(model, nn.Module):
        return _nnx_forward(config, model, images, source.num_classes)
    _check_call(model, name, flag)
    kwargs = {flag: False} if flag else {}

    def trace(x):
        variables = model.init(jax.random.key(0), x, **kwargs)
        return model.apply(variables, x, **kwargs), variables

    variables = _check_output(trace, name, images, source.num_classes)
    rules = _rules(config, name, variables)
    try:
        qmodel = quantize_model(model, rules)
        jax.eval_shape(lambda k, x: qmodel.init(k, x, **kwargs), jax.random.key(0), images)
    except ValueError as err:
        raise _misfit(config, err) from None
    return RulesForward(
        qmodel,
        train_flag=flag,
        has_batchnorm=bool(jax.tree_util.tree_leaves(variables.get("batch_stats", {}))),
        description=_description(config),
    )


def package_forward(config: ml_collections.ConfigDict, num_classes: int) -> RulesForward:
    """The forward of one of the package's families (``config.model.name`` a name of
    :data:`oscqat_jax.models.MODELS`): the plain model quantized by the rules of
    ``config.quant`` (:func:`.build.quantized_model`), called with ``train=...``; its
    ``model.pretrained`` is a PyTorch checkpoint in ``model.pretrained_layout``."""
    return RulesForward(
        build.quantized_model(config, num_classes),
        train_flag="train",
        has_batchnorm=True,
        description=f"{config.model.name} (width {config.model.width_multiplier})",
        pytorch_layouts=True,
    )


def _nnx_forward(config, build, images, num_classes: int) -> NNXForward:
    """The forward of the NNX model ``build(rngs)`` makes, after the same checks; they run
    on abstract models (``nnx.eval_shape``: nothing computed before a refusal)."""
    name, flag = config.model.name, config.model.train_flag
    model = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    _check_call(model, name, flag)
    kwargs = {flag: False} if flag else {}
    model.eval()
    graphdef, state = nnx.split(model)

    def trace(x, state):
        return nnx.merge(graphdef, state)(x, **kwargs), {"params": pure_state(model, nnx.Param)}

    variables = _check_output(trace, name, images, num_classes, state)
    rules = _rules(config, name, variables)
    try:
        nnx.eval_shape(lambda: quantize_model(build(nnx.Rngs(0)), rules))
    except ValueError as err:
        raise _misfit(config, err) from None
    return NNXForward.create(build, rules, train_flag=flag, description=_description(config))


def _misfit(config, err: ValueError) -> ValueError:
    """The sentence for rules that do not fit the model (``err`` from quantize_model)."""
    reason = _first_line(err)
    if not config.quant.rules:  # paper_rules puts the classifier's rule first, then the stem's
        for index, field in enumerate(("classifier", "first_conv")):
            reason = reason.replace(f"rules[{index}] (", f"config.model.{field} (")
    return ValueError(f"The rules of the config do not fit {config.model.name}: {reason}.")


def _description(config) -> str:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in config.model.kwargs.items())
    return f"{config.model.name}({kwargs})"


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else type(err).__name__


def _import(path: str, field: str, what: str):
    """The attribute ``module:attr`` names; one sentence naming ``field`` when it cannot."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 -- any error of the user's module is reported as such
        raise ValueError(
            f"config.{field} = {path!r}: the module {module_name} cannot be imported "
            f"({type(err).__name__}: {_first_line(err)}); name {what} on the Python path."
        ) from None
    found = module
    for part in attr.split("."):
        if not hasattr(found, part):
            raise ValueError(
                f"config.{field} = {path!r}: {module_name} has no attribute {attr!r}; name "
                f"{what} defined in that module."
            )
        found = getattr(found, part)
    return found


def _own_model(config, num_classes: int) -> nn.Module | Callable[[nnx.Rngs], nnx.Module]:
    """The unbound Linen module, or for an NNX model the function of ``rngs`` that builds it."""
    path = config.model.name
    factory = _import(path, "model.name", "a function or Flax Module class")
    if not callable(factory):
        raise ValueError(
            f"config.model.name = {path!r} is a {type(factory).__name__}, not a function or "
            "class that returns a flax.linen or flax.nnx Module."
        )
    kwargs = config.model.kwargs.to_dict()
    if "num_classes" not in kwargs and _takes(factory, "num_classes"):
        kwargs["num_classes"] = num_classes
    seeded = _takes(factory, "rngs")
    made = []

    def make():  # an NNX model comes out abstract: its initialisers do not run
        made.append(factory(**kwargs, **({"rngs": nnx.Rngs(0)} if seeded else {})))
        return made[0] if isinstance(made[0], nnx.Module) else None

    try:
        abstract = nnx.eval_shape(make)
        model = made[0] if abstract is None else abstract
    except Exception as err:  # noqa: BLE001 -- as above
        raise ValueError(
            f"config.model.name = {path!r}: calling it with config.model.kwargs {kwargs} failed "
            f"({type(err).__name__}: {_first_line(err)}); fix the kwargs or the function."
        ) from None
    if isinstance(model, nnx.Module):
        if not seeded:
            raise ValueError(
                f"config.model.name = {path!r} returns a flax.nnx model but takes no 'rngs' "
                "argument, so train.py cannot seed it; add the keyword rngs: nnx.Rngs and "
                "build the layers with it."
            )
        return lambda rngs: factory(**kwargs, rngs=rngs)
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"config.model.name = {path!r} returned a {type(model).__name__}, not a "
            "flax.linen.Module or flax.nnx.Module; return the (unbound) model."
        )
    return model


def _takes(fn, name: str) -> bool:
    if inspect.isclass(fn) and issubclass(fn, nnx.Module):
        fn = fn.__init__  # the metaclass's call hides the signature
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_call(model: nn.Module, name: str, flag: str) -> None:
    """One input (the image batch) and, unless ``flag`` is "", the keyword ``flag``."""
    params = list(inspect.signature(model.__call__).parameters.values())
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p.name for p in params if p.kind in positional and p.default is p.empty]
    required = [p for p in required if p != flag]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    if len(required) != 1 and not (variadic and not required):
        took = f"{len(required)} inputs ({', '.join(required)})" if required else "no input"
        raise ValueError(
            f"The model of config.model.name = {name!r} takes {took}, but train.py feeds it "
            "one image batch (N, H, W, C); wrap it in a module whose __call__ takes the images."
        )
    keywords = {p.name for p in params} | {"**" for p in params if p.kind == p.VAR_KEYWORD}
    if flag and flag not in keywords and "**" not in keywords:
        raise ValueError(
            f"The model of config.model.name = {name!r} has no argument {flag!r} "
            "(config.model.train_flag); set that field to the name of its BatchNorm/dropout "
            "switch, or to '' for a model without one."
        )


def _check_output(trace: Callable, name: str, images, num_classes: int, *args) -> dict:
    """The float variables' shapes, after checking that an image batch gives logits
    ``(N, num_classes)``; ``trace(images, *args) -> (logits, variables)`` in eval."""
    shape = "(N, " + ", ".join(map(str, images.shape[1:])) + ")"
    try:
        out, variables = jax.eval_shape(trace, images, *args)
    except Exception as err:  # noqa: BLE001 -- a Flax/JAX error of tracing the user's model
        raise ValueError(
            f"The model of config.model.name = {name!r} cannot take the data's float32 image "
            f"batch {shape} ({type(err).__name__}: {_first_line(err)}); train.py trains "
            "image classifiers."
        ) from None
    want = (images.shape[0], num_classes)
    if not isinstance(out, jax.ShapeDtypeStruct) or tuple(out.shape) != want:
        got = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"The model of config.model.name = {name!r} returns {got} for a batch of "
            f"{images.shape[0]} images, but the data has {num_classes} classes: return logits "
            f"(N, {num_classes})."
        )
    return dict(variables)


def _layers(variables: dict) -> list[str]:
    """The module paths that hold a kernel (the sites rules can name)."""
    flat = traverse_util.flatten_dict(dict(variables.get("params", {})))
    return sorted({"/".join(k[:-1]) for k in flat if k[-1] == "kernel"})


def _rules(config, name: str, variables: dict) -> Sequence:
    q = config.quant
    if q.rules:
        factory = _import(q.rules, "quant.rules", "a function returning a list of QuantRule")
        try:
            return factory(**q.rules_kwargs.to_dict())
        except Exception as err:  # noqa: BLE001 -- an error of the user's function
            raise ValueError(
                f"config.quant.rules = {q.rules!r}: calling it with config.quant.rules_kwargs "
                f"failed ({type(err).__name__}: {_first_line(err)})."
            ) from None
    if q.setup == "float":
        raise ValueError(
            "config.quant.setup = 'float' quantizes nothing; train.py trains quantized models: "
            "use a paper setup such as LSQ_paper."
        )
    m = config.model
    for field in ("first_conv", "classifier"):
        if not m[field]:
            raise ValueError(
                f"config.model.{field} is empty: name the {name} layer it means by a regex of "
                f"its path (the layers with a kernel: {', '.join(_layers(variables))})."
            )
    try:
        rules = _paper_rules(config)
    except ValueError as err:
        raise ValueError(
            f"The paper rules of config.quant.setup = {q.setup!r} cannot be written for {name}: "
            f"{_first_line(err)} (config.model.first_conv, classifier, head_output, logits)."
        ) from None
    if not q.quantize_activations:  # weight-only quantization, as the package's setups
        rules = [dataclasses.replace(r, act_bits=None, output_bits=None) for r in rules]
    return rules


def _paper_rules(config) -> tuple:
    q, m = config.quant, config.model
    return paper_rules(
        q.setup,
        q.n_bits,
        q.n_bits_act,
        first_conv=m.first_conv,
        classifier=m.classifier,
        head_output=m.head_output,
        logits=m.logits,
        per_channel=q.per_channel,
        weight_range_method=q.weight_range,
        act_range_method=q.act_range,
        grad_scale=q.grad_scale,
        max_bits=config.osc_freeze.max_bits,
    )
