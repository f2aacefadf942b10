"""CLI flags are built from the config dataclasses: one source of defaults (issue 16)."""
import ast
import dataclasses
from pathlib import Path

import pytest

from nnlab.cli import build_parser
from nnlab.config import dataclass_from_args
from nnlab.engine.train import TrainConfig
from nnlab.functa.classify import ClassifyConfig
from nnlab.functa.generate.model import GenerateConfig
from nnlab.functa.model import FunctaConfig
from nnlab.functa.presets import MetaTrainConfig
from nnlab.landscape.sweep import LandscapeConfig
from nnlab.lbi.experiments import LBIOptions, LBIRecordOptions, LBITrainConfig
from nnlab.lbi.gamma_prune import GammaPruneConfig
from nnlab.prune.methods import APViTOptions, PViTOptions
from nnlab.prune.sweep import PruneSweepConfig

# the config dataclasses each CLI module builds
CONFIGS = {"train.py": (TrainConfig,), "lbi.py": (LBITrainConfig, LBIOptions, LBIRecordOptions, GammaPruneConfig),
           "prune.py": (PruneSweepConfig, PViTOptions, APViTOptions),
           "functa.py": (FunctaConfig, MetaTrainConfig, ClassifyConfig, GenerateConfig),
           "landscape.py": (LandscapeConfig,)}
# flags whose name matches a field but that set something else
OWN_DEFAULTS = {("functa.py", "seed"): "`functa sample --seed` seeds the sampling, not the training"}


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_lbi_train_flags_default_to_the_dataclasses_and_override_them():
    args = parse("lbi", "train", "--out", "R")
    assert dataclass_from_args(LBITrainConfig, args) == LBITrainConfig()
    assert dataclass_from_args(LBIOptions, args) == LBIOptions()
    assert dataclass_from_args(LBIRecordOptions, args) == LBIRecordOptions()
    args = parse("lbi", "train", "--out", "R", "--epochs", "3", "--no-compiled", "--layer-lam", "conv3=4",
                 "--no-eval-wstar", "--model-option", "width=0.5")
    cfg, lbi = dataclass_from_args(LBITrainConfig, args), dataclass_from_args(LBIOptions, args)
    assert (cfg.epochs, cfg.lr, cfg.model_options) == (3, LBITrainConfig.lr, {"width": 0.5})
    assert (lbi.compiled, lbi.layer_lam, lbi.decoupled_wd) == (False, {"conv3": 4.0}, None)
    assert dataclass_from_args(LBIRecordOptions, args).eval_wstar is False
    assert LBITrainConfig().optimizer == "slbi" and TrainConfig().optimizer == "sgd"  # the subclass's own defaults


def test_prune_sweep_nested_options_use_their_prefix_and_aliases():
    args = parse("prune", "sweep", "--checkpoint", "C", "--out", "O")
    assert dataclass_from_args(PruneSweepConfig, args) == PruneSweepConfig(checkpoint="C", out="O")
    assert dataclass_from_args(PViTOptions, args, prefix="pvit") == PViTOptions()
    args = parse("prune", "sweep", "--checkpoint", "C", "--out", "O", "--ratios", "0.2,0.5", "--pvit-l1", "0.5",
                 "--train-limit", "64", "--apvit-epochs", "2", "--apvit-thresholds", "0.1,0.3")
    assert dataclass_from_args(PruneSweepConfig, args).ratios == [0.2, 0.5]
    assert dataclass_from_args(PViTOptions, args, prefix="pvit") == PViTOptions(l1_weight=0.5, train_limit=64)
    assert dataclass_from_args(APViTOptions, args, prefix="apvit") == APViTOptions(epochs=2, thresholds=[0.1, 0.3])


def test_functa_classify_and_train_flags():
    args = parse("functa", "classify", "A", "B", "--out", "O", "--hidden", "64,32", "--no-normalize")
    assert dataclass_from_args(ClassifyConfig, args) == ClassifyConfig(hidden=[64, 32], normalize=False)
    args = parse("functa", "train", "--preset", "tiny", "--data", "mnist-5k", "--out", "O", "--latent-hidden", "32")
    assert args.latent_hidden == [32]


def test_functa_train_flags_come_from_meta_train_config_and_keep_the_presets_values():
    """Every MetaTrainConfig field is a flag (old spellings kept as aliases); unset flags leave the preset's value."""
    from nnlab.cli.functa import preset_from_args
    from nnlab.functa.presets import PRESETS

    args = parse("functa", "train", "--preset", "mnist-cpu", "--data", "mnist", "--out", "O")
    assert {f: getattr(args, f) for f in MetaTrainConfig.__dataclass_fields__} == dict.fromkeys(
        MetaTrainConfig.__dataclass_fields__)
    args = parse("functa", "train", "--preset", "mnist-cpu", "--data", "mnist", "--out", "O", "--time-limit", "7",
                 "--checkpointing", "--grad-clip", "0.5", "--seed", "3", "--latent-dim", "64")
    preset = preset_from_args(args)
    base = PRESETS["mnist-cpu"].train
    assert (preset.train.time_limit_min, preset.train.use_checkpoint, preset.train.grad_clip, preset.train.seed) == (
        7.0, True, 0.5, 3)
    assert (preset.train.steps, preset.train.outer_lr, preset.train.meta_lr_mult) == (
        base.steps, base.outer_lr, base.meta_lr_mult)
    assert preset.model.latent_dim == 64 and preset.model.width == PRESETS["mnist-cpu"].model.width


def _literal_defaults(path: Path):
    """(dest, default) of every add_argument call in ``path`` whose default is a literal."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        if "default" not in kw or not flags:
            continue
        try:
            value = ast.literal_eval(kw["default"])
        except ValueError:
            continue  # a name or attribute: taken from a dataclass
        dest = ast.literal_eval(kw["dest"]) if "dest" in kw else flags[0][2:].replace("-", "_")
        yield dest, value


def test_no_cli_default_repeats_a_dataclass_default():
    cli = Path(__file__).resolve().parents[1] / "src" / "nnlab" / "cli"
    repeated = []
    for name, classes in CONFIGS.items():
        defaults = {f.name: repr(f.default) for cls in classes for f in dataclasses.fields(cls)
                    if f.default is not dataclasses.MISSING}
        defaults.update({f.name: repr(f.default_factory()) for cls in classes for f in dataclasses.fields(cls)
                         if f.default_factory is not dataclasses.MISSING})
        repeated += [f"{name}: --{dest} default {value!r}" for dest, value in _literal_defaults(cli / name)
                     if defaults.get(dest) == repr(value) and (name, dest) not in OWN_DEFAULTS]
    assert repeated == []


def test_the_check_finds_a_repeated_default(tmp_path):
    source = tmp_path / "x.py"
    source.write_text('p.add_argument("--epochs", type=int, default=32)\np.add_argument("--lr", default=d.lr)\n')
    assert list(_literal_defaults(source)) == [("epochs", 32)]


def test_lbi_prune_flags():
    args = parse("lbi", "prune", "RUN", "--out", "O", "--ratios", "0,0.5", "--finetune-epochs", "1")
    assert dataclass_from_args(GammaPruneConfig, args) == GammaPruneConfig(ratios=[0.0, 0.5], finetune_epochs=1)
    assert dataclass_from_args(GammaPruneConfig, parse("lbi", "prune", "RUN", "--out", "O")) == GammaPruneConfig()


@pytest.mark.parametrize("argv, fragment", [
    (["prune", "sweep", "--checkpoint", "C", "--out", "O", "--ratios", "a"], "comma-separated numbers"),
    (["functa", "classify", "A", "B", "--out", "O", "--hidden", "x"], "comma-separated whole numbers"),
])
def test_list_flags_reject_bad_values(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2 and fragment in capsys.readouterr().err


def test_every_config_file_parses_under_its_command():
    """configs/*.yaml hold only options their command knows (a typo would be a ConfigError), and
    their values become the command's defaults."""
    import yaml

    from nnlab.config import apply_config_defaults

    root = Path(__file__).resolve().parents[1] / "configs"
    commands = {"prune-": (["prune", "sweep"], ["--checkpoint", "C", "--out", "O"]), "": (["train"], ["--out", "O"])}
    for path in sorted(root.glob("*.yaml")):
        words, rest = next(v for k, v in commands.items() if path.name.startswith(k))
        sub = parse(*words, *rest)._parser
        apply_config_defaults(sub, path)
        args = sub.parse_args(rest)
        for key, value in yaml.safe_load(path.read_text()).items():
            assert getattr(args, key.replace("-", "_")) == value, (path.name, key)


@pytest.mark.parametrize("name,run", [("mnist-10min-64", "l64-w0-20-h0.5-scale-s24"),
                                      ("mnist-10min-256", "l256-scale-steps-lr1e-3-s24")])
def test_ten_minute_presets_are_the_published_runs_configs(name, run):
    """The presets that name issue 17's 10-minute recipes resolve to exactly the config the published runs wrote."""
    import yaml

    from nnlab.functa.presets import get_preset

    published = yaml.safe_load((Path(__file__).parent.parent / "docs/results/functa-mnist-10min" / run /
                                "config.yaml").read_text())
    preset = get_preset(name)
    assert dataclasses.asdict(preset.model) == {**published["model"],
                                                "meta_sgd_init": tuple(published["model"]["meta_sgd_init"])}
    assert dataclasses.asdict(preset.train) == published["train"]
