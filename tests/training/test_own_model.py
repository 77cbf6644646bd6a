"""Your own Flax model in the training program (training/models.py, training/forward.py):
``configs/own_model.py`` (the Flax-examples ResNet of ``demos/flax_resnet.py``) run end to end
through ``python train.py`` at tiny sizes, resumed exactly, exported to both formats and
checked; and every model or rule list the program cannot take refused at start-up in one
sentence. The odd models and rules factories are in ``own_models.py`` beside this file."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from testkit import (
    ROOT,
    TESTS,
    assert_trees_equal,
    restore_final,
    run_pickling_script,
    tiny_config,
)

from oscqat_jax.nn import paper_rules, reestimate_bn
from oscqat_jax.training import build, fingerprint, models, trainer
from oscqat_jax.training.config import check_config_file

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG_FILE = os.path.join(ROOT, "configs", "own_model.py")
# The shipped config at tiny sizes: 8x8 digits, a width-4 ResNet, one float epoch of 11
# steps (1437 images, batches of 128), two QAT epochs of 11 steps each, checkpoints every 6.
TINY = {
    "data.image_size": 8,
    "data.batch_size": 128,
    "model.kwargs.width": 4,
    "float_train.epochs": 1,
    "train.epochs": 2,
    "train.log_every": 4,
    "train.checkpoint_every": 6,
    "eval.bn_batches": 2,
}
TOTAL_STEPS = 22


def own_config(**overrides) -> ml_collections.ConfigDict:
    """configs/own_model.py with :data:`TINY` and ``overrides`` (dotted field names)."""
    config = _load(CONFIG_FILE)
    for field, value in {**TINY, **overrides}.items():
        *groups, name = field.split(".")
        node = config
        for group in groups:
            node = node[group]
        node[name] = value
    return config


def _load(path: str) -> ml_collections.ConfigDict:
    check_config_file(path)
    namespace: dict = {}
    exec(compile(open(path).read(), path, "exec"), namespace)  # noqa: S102 -- our own config
    return namespace["get_config"]()


def _readme_commands() -> list[list[str]]:
    """The commands of the README's section "Train your own model with train.py"."""
    with open(os.path.join(ROOT, "README.md")) as f:
        section = f.read().split("\n## Train your own model with train.py\n", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines()]


README_COMMANDS = _readme_commands()
README_WORKDIR = "--workdir=/tmp/own_model"


def train_py(workdir, *flags: str, extra: dict | None = None) -> subprocess.CompletedProcess:
    """The README's ``python train.py --config=configs/own_model.py ...`` in ``workdir``, with
    :data:`TINY` and ``extra``, from the repository root."""
    overrides = {**TINY, **(extra or {})}
    python, *readme = README_COMMANDS[0]
    assert python == "python" and README_WORKDIR in readme, README_COMMANDS[0]
    command = [
        sys.executable,
        *(f"--workdir={workdir}" if arg == README_WORKDIR else arg for arg in readme),
        *(f"--config.{k}={v}" for k, v in overrides.items()),
        *flags,
    ]
    env = dict(os.environ, PYTHONPATH=HERE)  # own_models.py, for the refusals
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@dataclasses.dataclass(frozen=True)
class FakeSource:
    """What :func:`models.forward_of` reads of a data source."""

    num_classes: int = 10
    image_shape: tuple = (8, 8, 1)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("own_run"))
    result = train_py(workdir, f"--config.float_train.save_weights={workdir}/float.npz")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result.stdout


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_a_run_logs_float_qat_oscillations_and_pre_and_post_bn_evaluations(own_run):
    workdir, stdout = own_run
    assert "demos.flax_resnet:make_model(stage_sizes=(1, 1), width=4) on digits" in stdout
    rows = _rows(workdir)
    assert any("float/loss" in r for r in rows)
    qat = [r for r in rows if "qat/loss" in r]
    assert qat[-1]["step"] == TOTAL_STEPS
    assert all("qat/osc/oscillating" in r and "qat/osc/frozen" in r for r in qat)
    assert any(r["qat/osc/oscillating"] > 0 for r in qat)  # 4-bit weights do oscillate
    evals = [r for r in rows if "eval/top1_pre_bn" in r]
    assert [r["step"] for r in evals] == [11, 22]
    for r in evals:
        assert 0 <= r["eval/top1_post_bn"] <= 100
        assert any(k.startswith("eval/layer/") and k.endswith("/frozen") for k in r)
        assert any(k.startswith("eval/bn_mean_shift/") for k in r)
    # Chance is 10 %: the ResNet learnt digits through train.py.
    assert evals[-1]["eval/top1_post_bn"] > 30
    for name in ("accuracy.png", "oscillations.png", "threshold_distance.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-1] == str(TOTAL_STEPS)


def _beside(workdir: str, tmp_path, name: str) -> str:
    """A new workdir holding ``workdir``'s float model (its cache: no float phase again)."""
    other = str(tmp_path / name)
    os.makedirs(other)
    shutil.copytree(os.path.join(workdir, "float_model"), os.path.join(other, "float_model"))
    return other


@pytest.mark.slow
def test_a_stopped_and_resumed_run_ends_exactly_in_the_uninterrupted_state(
    own_run, tmp_path, capsys
):
    workdir, _ = own_run
    resumed = _beside(workdir, tmp_path, "resumed")
    trainer.train_and_evaluate(own_config(**{"train.stop_at_step": 9}), resumed)
    assert "Float model: loaded from" in capsys.readouterr().out  # an own model's float cache
    config = own_config()
    assert restore_final(resumed, config)[0] == 9
    trainer.train_and_evaluate(config, resumed)
    assert "Resuming QAT from step 9" in capsys.readouterr().out
    step_a, state_a = restore_final(workdir, config)
    step_b, state_b = restore_final(resumed, config)
    assert step_a == step_b == TOTAL_STEPS
    assert_trees_equal(state_a, state_b)  # exactly
    last = {k: v for k, v in _rows(workdir)[-1].items() if k.startswith("eval/")}
    again = {k: v for k, v in _rows(resumed)[-1].items() if k.startswith("eval/")}
    assert last and last == again


@pytest.mark.slow
def test_four_steps_per_call_end_in_the_state_of_one(own_run, tmp_path, capsys):
    workdir, _ = own_run
    other = _beside(workdir, tmp_path, "k4")
    config = own_config(**{"train.steps_per_call": 4})
    trainer.train_and_evaluate(config, other)
    assert "up to 4 steps per call" in capsys.readouterr().out
    _, state_a = restore_final(workdir, config)
    _, state_b = restore_final(other, config)
    assert_trees_equal(state_a["oscillation"], state_b["oscillation"], atol=1e-5)
    assert_trees_equal(state_a["params"], state_b["params"], atol=1e-4)


@pytest.mark.slow
def test_exports_agree_with_jax_and_the_export_check_passes(own_run, tmp_path, capsys, monkeypatch):
    from oscqat_jax import deploy, export
    from oscqat_jax.deploy import check
    from oscqat_jax.training import context

    workdir, _ = own_run
    config = own_config()
    native, onnx_file = str(tmp_path / "model.npz"), str(tmp_path / "model.onnx")
    manifest = trainer.export_checkpoint(config, workdir, native)
    assert manifest["model"]["kind"] == "rules" and manifest["call_kwargs"] == {"train": False}
    assert README_COMMANDS[1][-2:] == ["--mode=export", "--format=onnx"]  # what this writes
    trainer.export_checkpoint(config, workdir, onnx_file, export_format="onnx")

    ctx = context.open_run(config, workdir, write_metrics=False)
    try:
        forward, step, variables = trainer.restore_for_export(ctx)
        images = np.concatenate([batch[0] for batch in ctx.eval_batches()])
    finally:
        context.close_run(ctx)
    assert step == TOTAL_STEPS
    want = np.asarray(forward.logits(variables, images, "eval"))
    _, loaded = export.load_export(native, model=forward.quantized)
    got_native = forward.quantized.apply(loaded, images, mode="eval", train=False)
    np.testing.assert_allclose(np.asarray(got_native), want, atol=1e-5)
    got_onnx = deploy.run_onnx(onnx_file, images)
    np.testing.assert_allclose(got_onnx, want, atol=1e-4)
    assert np.mean(got_onnx.argmax(-1) == want.argmax(-1)) > 0.99

    # The README's check command, on this run's file and workdir, from the root.
    monkeypatch.chdir(ROOT)
    assert README_COMMANDS[2][:4] == ["python", "-m", "oscqat_jax.deploy", "check"]
    argv = [onnx_file if a.endswith(".onnx") else a for a in README_COMMANDS[2][4:]]
    argv = [f"--workdir={workdir}" if a == README_WORKDIR else a for a in argv]
    argv += [f"--config.{k}={v}" for k, v in TINY.items()]
    assert check.main(argv) == 0
    assert "Top-1 agreement: 100.00 %" in capsys.readouterr().out
    # The control: the check rebuilds the model from the config, so another width fails.
    assert check.main([*argv, "--config.model.kwargs.width=6"]) == 1
    assert "model.kwargs.width 4 → 6" in capsys.readouterr().err


@pytest.mark.slow
def test_a_changed_kwarg_refuses_the_resume_and_the_same_config_resumes(own_run):
    workdir, _ = own_run
    with pytest.raises(ValueError, match=r"changes model\.kwargs\.width 4 → 6"):
        trainer.evaluate_checkpoint(own_config(**{"model.kwargs.width": 6}), workdir)
    with pytest.raises(ValueError, match=r"changes model\.classifier"):
        trainer.evaluate_checkpoint(own_config(**{"model.classifier": "hea[d]"}), workdir)
    result = trainer.evaluate_checkpoint(own_config(), workdir)
    assert result["step"] == TOTAL_STEPS and result["top1_post_bn"] > 30


@pytest.mark.slow
def test_the_float_model_a_run_saved_is_a_pretrained_start(own_run, tmp_path):
    workdir, stdout = own_run
    float_top1 = float(re.search(r"Float model: top-1 ([\d.]+) %", stdout).group(1))
    config = own_config(
        **{
            "model.pretrained": f"{workdir}/float.npz",
            "float_train.epochs": 0,
            "train.epochs": 1,
        }
    )
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    # The float evaluation of the loaded weights is the one of the run that saved them.
    assert round(summary["float"], 2) == float_top1


def test_pretrained_weights_of_another_model_are_refused_in_one_sentence(tmp_path):
    from oscqat_jax import convert

    forward = models.forward_of(own_config(), FakeSource())
    image = jnp.zeros((1, 8, 8, 1))
    variables = forward.init(jax.random.key(0), image)
    path = str(tmp_path / "float.npz")
    convert.save_variables(path, forward.init(jax.random.key(1), image))
    loaded = forward.load_pretrained(path, variables, "auto")
    assert_trees_equal(loaded, forward.init(jax.random.key(1), image))
    wider = models.forward_of(own_config(**{"model.kwargs.width": 6}), FakeSource())
    with pytest.raises(ValueError, match=r"does not hold this model's weights \(batch_stats/"):
        wider.load_pretrained(path, wider.init(jax.random.key(0), image), "auto")


SHARDED_SCRIPT = textwrap.dedent(
    """
    import os, pickle, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path[:0] = [{root!r}, {tests!r}, {here!r}]
    import jax, numpy as np
    from jax.sharding import Mesh
    from test_own_model import own_config
    from oscqat_jax.training import build, context, data, models, phases, step as step_lib

    config = own_config(**{{"data.batch_size": 8, "data.eval_batch_size": 8}})
    source = data.load_dataset(config.data)
    forward = models.forward_of(config, source)

    def run(devices):
        sharded = step_lib.Sharded(Mesh(np.asarray(devices), ("data",)), step_lib.FAST_COMPILE)
        ctx = context.Context(config, "", source, sharded, None, forward=forward)
        variables = phases.calibrate(ctx, forward, phases.init_variables(forward, ctx))
        opt = build.optimizer(config, phase="qat", total_steps=6, steps_per_epoch=3)
        table = build.qat_schedules(config, opt, 6).table(6)
        settings = step_lib.OscillationSettings(dampen=True, momentum=0.5)
        fn = step_lib.make_train_step(forward, opt.tx, step_lib.StepConfig(oscillations=settings))
        train_step = sharded.jit_train_step(fn)
        state = sharded.replicate(step_lib.create_state(variables, opt.tx, jax.random.PRNGKey(0)))
        losses = []
        for step in range(2):
            hparams = dict(step_lib.hparams_at(table, step), freeze_threshold=np.float32(0.25),
                           dampening_weight=np.float32(0.02))
            state, metrics = train_step(state, sharded.put_batch(ctx.train_batch(step)), hparams)
            losses.append(np.asarray(metrics["loss"]))
        assert train_step._cache_size() == 1, "the train step was recompiled"
        bn = sharded.jit_batch_fn(step_lib.make_bn_stats_step(forward))
        stats = bn(state.variables, sharded.put_batch(ctx.train_batch(5)[0]))
        flat = jax.tree_util.tree_flatten_with_path(jax.device_get((state, stats)))[0]
        return dict(state={{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}},
                    losses=np.asarray(losses))

    with open(sys.argv[1], "wb") as f:
        pickle.dump({{"four": run(jax.devices()), "one": run(jax.devices()[:1])}}, f)
    """
)


@pytest.mark.slow
def test_an_own_models_steps_on_four_devices_match_one_device(tmp_path):
    script = SHARDED_SCRIPT.format(root=ROOT, tests=TESTS, here=HERE)
    runs = run_pickling_script(script, str(tmp_path / "runs.pkl"))
    four, one = runs["four"], runs["one"]
    assert set(four["state"]) == set(one["state"]) and len(four["state"]) > 20
    # The batch reductions differ in order only (float32 rounding, ~1e-7 after one step);
    # integer state exactly. Two steps: with 4-bit activations the network is discontinuous,
    # and a value that lands on a rounding threshold in one run only (an ulp apart) parts
    # the runs legitimately within a few steps (seen at the third: 6e-4 in one momentum
    # trace). The range search's losses are sums of hundreds of terms: relative rounding.
    for key, value in one["state"].items():
        rtol = 1e-4 if "quant_stats" in key else 1e-5
        np.testing.assert_allclose(four["state"][key], value, atol=1e-5, rtol=rtol, err_msg=key)
    np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-6)
    assert one["losses"][0] != one["losses"][1]  # the first step did change the model


# ----------------------------------------------------------------------------- no BatchNorm


@pytest.mark.slow
def test_a_model_without_batchnorm_trains_without_bn_reestimation(tmp_path, capsys):
    config = own_config(
        **{
            "model.name": "own_models:NoBatchNorm",
            "model.train_flag": "",
            "model.first_conv": "stem",
            "model.kwargs": {},
            "float_train.epochs": 0,
            "train.epochs": 1,
            "data.batch_size": 256,
            "train.checkpoint_every": 100,
        }
    )
    summary = trainer.train_and_evaluate(config, str(tmp_path))
    out = capsys.readouterr().out
    assert (
        "The model has no BatchNorm layer: BN re-estimation (eval.bn_reestimate) is skipped" in out
    )
    evals = [r for r in _rows(str(tmp_path)) if "eval/top1_pre_bn" in r]
    assert len(evals) == 1 and "eval/top1_post_bn" not in evals[0]
    assert summary["qat_post_bn"] is None and summary["frozen_end"] is not None
    _, state = restore_final(str(tmp_path), config)
    assert "batch_stats" not in state or not jax.tree_util.tree_leaves(state["batch_stats"])


# ----------------------------------------------------------------------------- refusals

REFUSALS = [
    ({"model.name": "no_such_module:make"}, r"the module no_such_module cannot be imported"),
    ({"model.name": "demos.flax_resnet:nope"}, r"demos.flax_resnet has no attribute 'nope'"),
    ({"model.name": "own_models:NOT_CALLABLE"}, r"is a int, not a function or class"),
    ({"model.name": "own_models:not_a_module"}, r"returned a int, not a flax\.linen\.Module"),
    ({"model.name": "own_models:broken"}, r"calling it .* failed \(RuntimeError: the factory"),
    ({"model.name": "own_models:TwoInputs"}, r"takes 2 inputs \(x, mask\), but train\.py feeds"),
    ({"model.name": "own_models:NoInput"}, r"takes no input, but train\.py feeds it one image"),
    (
        {"model.name": "own_models:Tokens"},
        r"cannot take the data's float32 image batch \(N, 8, 8, 1\)",
    ),
    (
        {"model.name": "own_models:wrong_classes", "model.train_flag": ""},
        r"returns \(2, 3\) .* has 10 classes",
    ),
    (
        {"model.name": "own_models:NoTrainFlag"},
        r"has no argument 'train' \(config\.model\.train_flag\)",
    ),
    (
        {"model.classifier": "fc"},
        r"do not fit .*: config\.model\.classifier \(module_path 'fc'\) matches no site",
    ),
    ({"model.first_conv": ""}, r"model\.first_conv is empty: .*conv_init, head"),
    (
        {"model.first_conv": "conv_init|head"},
        r"config\.model\.first_conv \(module_path 'conv_init\|head'\) is meant for one",
    ),
    ({"model.first_conv": "("}, r"paper rules .* cannot be written .*not a valid regular"),
    ({"quant.setup": "float"}, r"quant\.setup = 'float' quantizes nothing"),
    ({"quant.setup": "LSQ"}, r"setup 'LSQ' quantizes the activations that feed the pooling"),
    ({"quant.rules": "own_models:rules_quantizing_nothing"}, r"No rule quantizes any site"),
    ({"quant.rules": "own_models:rules_matching_nothing"}, r"'no_such_layer'\) matches no site"),
    ({"quant.rules": "own_models:rules_not_rules"}, r"rules\[0\] must be a QuantRule, got str"),
    ({"quant.rules": "own_models:nope"}, r"own_models has no attribute 'nope'"),
]


@pytest.mark.parametrize(
    "overrides, match",
    REFUSALS,
    ids=[",".join(f"{k}={v}" for k, v in overrides.items()) for overrides, _ in REFUSALS],
)
def test_what_does_not_fit_is_refused_in_one_sentence(overrides, match):
    config = own_config(**overrides)
    if overrides.get("model.name", "").startswith("own_models:"):
        config.model.kwargs = {}
    with pytest.raises(ValueError, match=match) as error:
        models.forward_of(config, FakeSource())
    assert "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_the_controls_of_the_refusals_build_forwards():
    forward = models.forward_of(own_config(), FakeSource())
    assert forward.has_batchnorm and forward.train_flag == "train"
    # A Linen Module class serves as the factory too.
    by_class = models.forward_of(
        own_config(**{"model.name": "demos.flax_resnet:ResNet"}), FakeSource()
    )
    assert by_class.model == forward.model
    config = own_config(**{"model.name": "own_models:NoBatchNorm", "model.train_flag": ""})
    config.model.kwargs = {}
    config.quant.rules = "own_models:rules_for_no_batchnorm"
    config.quant.rules_kwargs = {"n_bits": 3}
    forward = models.forward_of(config, FakeSource())
    assert not forward.has_batchnorm
    want = paper_rules("LSQ_paper", 3, first_conv="stem", classifier="head")
    assert forward.quantized.rules == want


def test_weight_only_quantization_leaves_every_activation_float():
    config = own_config(**{"quant.quantize_activations": False})
    rules = models.forward_of(config, FakeSource()).quantized.rules
    assert rules and all(r.act_bits is None and r.output_bits is None for r in rules)
    assert any(r.weight_bits == 4 for r in rules)
    plan = models.forward_of(own_config(), FakeSource()).quantized.rules
    assert any(r.act_bits == 4 for r in plan)  # the control: activations quantized by default


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.name": "no_such_module:make"}, "the module no_such_module cannot be imported"),
        ({"model.name": "own_models:nnx_factory"}, "takes no 'rngs' argument"),
    ],
)
@pytest.mark.slow
def test_train_py_refuses_in_one_sentence_and_writes_nothing(tmp_path, overrides, message):
    workdir = tmp_path / "run"
    result = train_py(str(workdir), extra=overrides)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], lines
    assert not workdir.exists()


# ----------------------------------------------------------------------------- config


def test_own_model_fields_and_the_package_models_fields_are_not_mixed():
    build.validate(own_config())
    with pytest.raises(ValueError, match=r"^config\.model\.width_multiplier = 0\.5 .*package"):
        build.validate(own_config(**{"model.width_multiplier": 0.5}))
    with pytest.raises(ValueError, match=r"^config\.model\.kwargs = \{'width': 4\} .*import path"):
        package = tiny_config()
        package.model.kwargs = {"width": 4}
        build.validate(package)
    with pytest.raises(ValueError, match=r"^config\.quant\.rules = 'a:b' .*use quant\.setup"):
        build.validate(tiny_config(quant__rules="a:b"))
    with pytest.raises(ValueError, match=r"^config\.model\.name = 'demos/flax_resnet' "):
        build.validate(own_config(**{"model.name": "demos/flax_resnet"}))


def test_the_fingerprint_fixes_an_own_models_kwargs_and_rules():
    config = own_config()
    qat = fingerprint.run_metadata(config, "qat", 10)
    float_ = fingerprint.run_metadata(config, "float", 10)
    for name, value in {
        "model.name": "demos.flax_resnet:make_model",
        "model.kwargs.width": 4,
        "model.kwargs.stage_sizes": (1, 1),
        "model.train_flag": "train",
        "model.first_conv": "conv_init",
        "model.classifier": "head",
        "quant.rules": "",
    }.items():
        assert qat.fixed[name] == value, name
    # The float model does not depend on the rules: a new classifier pattern reuses it.
    assert "model.kwargs.width" in float_.fixed and "model.classifier" not in float_.fixed
    other = own_config(**{"model.kwargs.width": 6})
    assert fingerprint.run_metadata(other, "float", 10).fixed != float_.fixed
    factory = own_config(**{"quant.rules": "own_models:rules_for_no_batchnorm"})
    factory.quant.rules_kwargs = {"n_bits": 3}
    assert fingerprint.run_metadata(factory, "qat", 10).fixed["quant.rules_kwargs.n_bits"] == 3


def test_the_package_models_record_none_of_the_own_model_fields():
    for phase in ("float", "qat"):
        metadata = fingerprint.run_metadata(tiny_config(), phase, 4)
        recorded = {**metadata.fixed, **metadata.tunable}
        assert not [k for k in recorded if k.startswith(("model.kwargs", "model.train_flag"))]
        assert not [k for k in recorded if k in ("model.first_conv", "quant.rules")]
        assert "model.width_multiplier" in recorded  # the control


# ----------------------------------------------------------------------------- the forward


@pytest.mark.slow
def test_bn_reestimation_batch_by_batch_equals_the_verb_over_all_batches():
    forward = models.forward_of(own_config(), FakeSource())
    images = [jax.random.normal(jax.random.key(i), (16, 8, 8, 1)) for i in range(3)]
    variables = forward.calibrate(
        jax.jit(forward.init)(jax.random.key(0), images[0][:1]), images[:1], jax.random.key(1)
    )
    per_batch = [jax.jit(forward.bn_statistics)(variables, x) for x in images]
    ours = forward.average_bn(per_batch)
    verb = reestimate_bn(forward.quantized, variables, images, train=False)["batch_stats"]
    assert_trees_equal(ours, verb, atol=1e-6, rtol=1e-6)
    # The control: the running statistics were not already these.
    diff = jax.tree_util.tree_map(
        lambda a, b: jnp.max(jnp.abs(a - b)), ours, variables["batch_stats"]
    )
    assert max(jax.tree_util.tree_leaves(diff)) > 1e-3
