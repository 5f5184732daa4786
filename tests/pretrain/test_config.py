import pytest

from launch.__main__ import main as launch_main
from pretrain.config import ConfigError, deepspeed_config, load_config
from pretrain.train import main as train_main


def test_dotted_overrides_are_typed_and_applied(tiny_config):
    config = load_config(tiny_config(), ["train.lr=1e-3", "model.position=rotary", "train.betas=[0.9, 0.99]"])
    assert config.train.lr == 1e-3
    assert config.model.position == "rotary"
    assert config.train.betas == (0.9, 0.99)


def test_the_quickstart_config_is_valid():
    config = load_config("configs/quickstart.yaml")
    assert config.name == "quickstart"
    config.batch_layout(2)


@pytest.mark.parametrize(
    ("overrides", "field", "keyword"),
    [
        (["model.n_layers=4"], "model.n_layers", "unknown key"),  # a typo for n_layer
        (["train.max_steps=many"], "train.max_steps", ""),
        (["deepspeed.zero_stage=5"], "deepspeed.zero_stage", ""),
        (["model.d_model=100", "model.n_head=3"], "model", ""),
        (["data.sources=[{kind: icl_episodes, episode: 3}]"], "data.sources.0.episode", "unknown key"),
        (["model.n_layer.deep=1"], "model.n_layer", ""),
        (["train.lr"], "override 'train.lr'", ""),
        (["eval.fewshot.shots=[0, -2]"], "eval.fewshot.shots", ""),
        (["eval.fewshot.tasks=[]"], "eval.fewshot.tasks", ""),
        (["logging.wandb_tags=[ok, '']"], "logging.wandb_tags.1", ""),
        (["logging.stall_alert_minutes=-5"], "logging.stall_alert_minutes", ""),
        (["train.lr=.nan"], "train.lr", ""),
        (["data.val_fraction=.inf"], "data.val_fraction", ""),
        (["train.betas=[0.9, 1.0]"], "train.betas.1", ""),
        (["train.betas=[-0.1, 0.95]"], "train.betas.0", ""),
        (["data.shard_url=https://me:s3cret@store.example/{shard}"], "data.shard_url", ""),
    ],
)
def test_bad_values_are_refused_naming_the_field(tiny_config, overrides, field, keyword):
    with pytest.raises(ConfigError) as caught:
        load_config(tiny_config(), overrides)
    assert str(caught.value).startswith(f"{field}:")
    assert keyword in str(caught.value)
    assert "s3cret" not in str(caught.value)  # a refused credential is not repeated where it could be logged


def test_global_batch_must_divide_into_ranks_and_micro_batches(tiny_config):
    config = load_config(tiny_config(), ["train.global_batch_tokens=3000"])
    with pytest.raises(ConfigError, match=r"^train\.global_batch_tokens: 3000 is not divisible .* = 1024"):
        config.batch_layout(2)


def test_batch_layout_derives_accumulation_from_tokens_and_world_size(tiny_config):
    config = load_config(tiny_config())
    two_ranks, one_rank = config.batch_layout(2), config.batch_layout(1)
    assert (two_ranks.accumulation_steps, one_rank.accumulation_steps) == (2, 4)
    assert two_ranks.tokens_per_step == one_rank.tokens_per_step == 2048


def test_deepspeed_json_is_generated_from_the_config(tiny_config):
    config = load_config(tiny_config(), ["deepspeed.zero_stage=3", "train.grad_clip=0.5"])
    layout = config.batch_layout(2)
    ds = deepspeed_config(config, layout, "bf16")
    assert ds["train_batch_size"] == 32 == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["model.n_layers=4"], "model.n_layers"),
        (["train.max_steps=ten"], "train.max_steps"),
        (["train.global_batch_tokens=3000"], "train.global_batch_tokens"),
    ],
)
def test_command_line_config_errors_exit_2_with_one_line_naming_the_field(in_process, tiny_config, tmp_path,
                                                                          overrides, field):
    result = in_process(launch_main, "run", "--config", str(tiny_config()), "--ranks", "2", *overrides)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"config error: {field}:"), result.stderr
    assert not (tmp_path / "runs").exists(), "nothing may start for a bad config"


def test_training_entry_point_refuses_bad_config_with_exit_2(in_process, tiny_config):
    result = in_process(train_main, "--config", str(tiny_config()), "eval.batches=0")
    assert result.returncode == 2
    assert result.stderr.startswith("config error: eval.batches:")


def test_a_missing_config_file_is_named(in_process, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = in_process(launch_main, "run", "--config", "nowhere.yaml")
    assert result.returncode == 2
    assert "nowhere.yaml" in result.stderr


def test_a_config_includes_files_relative_to_itself_in_order_with_its_own_settings_on_top(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "shape.yaml").write_text("model: {n_layer: 6, d_model: 96, n_head: 4}\ntrain: {lr: 0.1}\n")
    (tmp_path / "parts" / "recipe.yaml").write_text("train: {lr: 0.2, warmup_steps: 7}\n")
    (tmp_path / "run.yaml").write_text("include: [parts/shape.yaml, parts/recipe.yaml]\nmodel: {n_layer: 3}\n")
    config = load_config(tmp_path / "run.yaml", ["train.max_steps=9"])
    assert (config.model.n_layer, config.model.d_model, config.model.n_head) == (3, 96, 4)
    assert (config.train.lr, config.train.warmup_steps, config.train.max_steps) == (0.2, 7, 9)


@pytest.mark.parametrize(("files", "names"), [
    ({"run.yaml": "include: [a.yaml]\n", "a.yaml": "include: [run.yaml]\n"}, "run.yaml: includes itself"),
    ({"run.yaml": "include: [gone.yaml]\n"}, "gone.yaml: config file not found"),
    ({"run.yaml": "include: a.yaml\n"}, "run.yaml: include: must be a list"),
])
def test_an_include_that_cannot_be_followed_is_refused_naming_the_file(in_process, tmp_path, files, names):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = in_process(launch_main, "run", "--config", str(tmp_path / "run.yaml"))
    assert result.returncode == 2
    assert names in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
