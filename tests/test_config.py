"""Config loading: defaults < YAML < key=value, type coercion, errors, save/load, help."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from posttrain.config import (
    config_from_dict,
    config_help,
    config_to_dict,
    flatten_keys,
    load_config,
    save_config,
    to_yaml,
)
from posttrain.errors import ConfigError
from posttrain.models.lora import LoraConfig
from posttrain.train.config import TrainConfig


@dataclass
class FooConfig(TrainConfig):
    """A test-only recipe config with one extra key."""

    beta: float = field(default=0.1, metadata={"help": "test-only strength"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "free-form kwargs"})
    steps_list: list[int] = field(default_factory=list, metadata={"help": "ints"})
    scales: list[float] = field(default_factory=list, metadata={"help": "floats"})

    def validate(self) -> None:
        super().validate()
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")


@dataclass
class Inner:
    x: int = field(default=1, metadata={"help": "inner x"})

    def validate(self) -> None:
        if self.x == 13:
            raise ConfigError("inner.x must not be 13")


@dataclass
class Outer:
    inner: Inner = field(default_factory=lambda: Inner(x=5), metadata={"help": "inner group"})
    maybe: Inner | None = field(default=None, metadata={"help": "optional group"})


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    cfg = load_config(TrainConfig)
    assert cfg == TrainConfig()
    assert cfg.model == "tiny" and cfg.data is None and cfg.max_steps == -1
    assert cfg.lr == 1e-4 and cfg.lr_scheduler == "cosine" and cfg.precision == "bf16"
    assert cfg.report_to == ["jsonl"]
    assert cfg.lora == LoraConfig() and cfg.lora.r == 0
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    # Mutable defaults must not be shared between instances.
    assert TrainConfig().report_to is not TrainConfig().report_to


def test_yaml_then_overrides_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 0.5\nbatch_size: 4\nseed: 3\n")
    cfg = load_config(TrainConfig, path, ["lr=0.25", "seed=7", "seed=9"])
    assert cfg.lr == 0.25  # override beats the file
    assert cfg.batch_size == 4  # file beats the default
    assert cfg.seed == 9  # later overrides win
    assert cfg.max_length == 1024  # untouched default


def test_nested_yaml_mapping_and_dotted_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "lora:\n  r: 4\n  alpha: 8\nlora.dropout: 0.1\n")
    cfg = load_config(TrainConfig, path, ["lora.r=8", "lora.target_modules=q_proj,v_proj"])
    assert cfg.lora.r == 8
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.lora.dropout == 0.1
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.merge is False  # a partial mapping merges into the defaults


def test_nested_group_keeps_parent_field_default() -> None:
    cfg = config_from_dict(Outer, {"maybe.x": 2})
    assert cfg.inner.x == 5  # the parent's default_factory, not Inner's own default
    assert cfg.maybe == Inner(x=2)
    assert config_from_dict(Outer, {"inner": {}}).inner.x == 5


def test_scientific_notation_string_is_float(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-4 (no dot) as a string.
    path = write(tmp_path, "lr: 1e-4\nweight_decay: 1\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.weight_decay == 1.0 and isinstance(cfg.weight_decay, float)
    assert load_config(TrainConfig, overrides=["lr=2e-5"]).lr == 2e-5


def test_int_coercion() -> None:
    assert load_config(TrainConfig, overrides=["max_steps=1e3"]).max_steps == 1000
    assert load_config(TrainConfig, overrides=["max_steps=1000"]).max_steps == 1000
    for bad in ("1.5", "true", "abc"):
        with pytest.raises(ConfigError, match="config key 'max_steps': expected int"):
            load_config(TrainConfig, overrides=[f"max_steps={bad}"])


def test_int_rejects_yaml_bool(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected int, got True"):
        load_config(TrainConfig, write(tmp_path, "seed: yes\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("Yes", True),
        ("ON", True),
        ("1", True),
        ("false", False),
        ("no", False),
        ("Off", False),
        ("0", False),
    ],
)
def test_bool_strings(text: str, expected: bool) -> None:
    assert load_config(TrainConfig, overrides=[f"resume={text}"]).resume is expected


def test_bool_rejects_other_text() -> None:
    with pytest.raises(ConfigError, match="config key 'resume': expected bool, got 'maybe'"):
        load_config(TrainConfig, overrides=["resume=maybe"])


def test_optional_null(tmp_path: Path) -> None:
    cfg = load_config(TrainConfig, write(tmp_path, "data: x.jsonl\neval_data: y.jsonl\n"))
    assert cfg.data == "x.jsonl"
    for word in ("null", "None", "~"):
        assert load_config(TrainConfig, overrides=["data=a", f"data={word}"]).data is None
    assert load_config(TrainConfig, write(tmp_path, "data: null\n", "n.yaml")).data is None
    assert config_from_dict(Outer, {"maybe": {"x": 3}}).maybe == Inner(x=3)
    assert load_config(Outer, overrides=["maybe.x=3", "maybe=null"]).maybe is None


def test_literal_rejection_lists_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=["lr_scheduler=cosin"])
    message = str(err.value)
    assert "'lr_scheduler'" in message and "'cosin'" in message
    for choice in ("constant", "linear", "cosine"):
        assert repr(choice) in message
    assert load_config(TrainConfig, overrides=["precision=fp32"]).precision == "fp32"


def test_lists_from_comma_string_and_yaml(tmp_path: Path) -> None:
    cfg = load_config(FooConfig, overrides=["report_to=jsonl, tensorboard", "steps_list=1,2,3"])
    assert cfg.report_to == ["jsonl", "tensorboard"]
    assert cfg.steps_list == [1, 2, 3]
    cfg = load_config(FooConfig, write(tmp_path, "scales: [1, 2.5]\nreport_to: [wandb]\n"))
    assert cfg.scales == [1.0, 2.5] and all(isinstance(v, float) for v in cfg.scales)
    assert cfg.report_to == ["wandb"]
    assert load_config(FooConfig, overrides=["steps_list=[4, 5]"]).steps_list == [4, 5]
    assert load_config(FooConfig, overrides=["report_to="]).report_to == []
    with pytest.raises(ConfigError, match=r"config key 'steps_list\[1\]': expected int"):
        load_config(FooConfig, overrides=["steps_list=1,x"])


def test_dict_field(tmp_path: Path) -> None:
    cfg = load_config(FooConfig, write(tmp_path, "extra:\n  a: 1\n  b: [x]\n"))
    assert cfg.extra == {"a": 1, "b": ["x"]}
    assert load_config(FooConfig, overrides=["extra={k: 2}"]).extra == {"k": 2}
    with pytest.raises(ConfigError, match="config key 'extra': expected dict"):
        load_config(FooConfig, overrides=["extra=[1]"])


def test_unknown_key_suggests_closest() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(FooConfig, overrides=["lrr=1"])
    assert str(err.value) == "unknown config key 'lrr' for FooConfig; did you mean 'lr'?"


def test_unknown_key_without_close_match_has_no_hint() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=["zzzzzz=1"])
    assert str(err.value) == "unknown config key 'zzzzzz' for TrainConfig"


def test_unknown_nested_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank'.*'lora\.r'"):
        load_config(TrainConfig, overrides=["lora.rank=8"])
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.bogus'") as err:
        load_config(TrainConfig, write(tmp_path, "lora:\n  bogus: 1\n"))
    assert "cfg.yaml" in str(err.value)  # errors from a file name the file
    # A dotted key through a plain value is unknown too; a bare nested name suggests its group.
    with pytest.raises(ConfigError, match="unknown config key 'lr.x'"):
        load_config(TrainConfig, overrides=["lr.x=1"])
    with pytest.raises(ConfigError, match="did you mean 'lora.r'"):
        load_config(TrainConfig, overrides=["r=8"])


def test_nested_group_needs_mapping() -> None:
    with pytest.raises(ConfigError, match="config key 'lora': expected a mapping"):
        load_config(TrainConfig, overrides=["lora=8"])


def test_wrong_type_names_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=["max_steps=abc"])
    assert str(err.value) == "config key 'max_steps': expected int, got 'abc'"
    with pytest.raises(ConfigError, match="config key 'lora.alpha': expected float"):
        load_config(TrainConfig, write(tmp_path, "lora: {alpha: [1]}\n"))
    with pytest.raises(ConfigError, match="config key 'model': expected str, got True"):
        load_config(TrainConfig, write(tmp_path, "model: yes\n", "b.yaml"))


def test_override_without_equals() -> None:
    with pytest.raises(ConfigError, match="key=value") as err:
        load_config(TrainConfig, overrides=["lr"])
    assert "'lr'" in str(err.value)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(TrainConfig, overrides=["=3"])


def test_override_value_may_contain_equals() -> None:
    assert load_config(TrainConfig, overrides=["data=a=b.jsonl"]).data == "a=b.jsonl"


def test_missing_yaml_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as err:
        load_config(TrainConfig, missing)
    assert str(missing) in str(err.value)


def test_yaml_syntax_error_names_path_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "lr: 1\nseed: [1, 2\nmodel: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    message = str(err.value)
    assert str(path) in message and "line 3" in message
    assert "\n" not in message


def test_yaml_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- lr\n- seed\n")
    with pytest.raises(ConfigError, match="must be a mapping") as err:
        load_config(TrainConfig, path)
    assert str(path) in str(err.value)


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    assert load_config(TrainConfig, write(tmp_path, "# nothing yet\n")) == TrainConfig()
    assert load_config(TrainConfig, write(tmp_path, "lora:\n", "l.yaml")).lora == LoraConfig()


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("batch_size=0", "batch_size must be >= 1"),
        ("grad_accum=0", "grad_accum must be >= 1"),
        ("lr=0", "lr must be > 0"),
        ("lr=nan", "lr must be > 0"),
        ("max_length=1", "max_length must be >= 2"),
        ("warmup_steps=-1", "warmup_steps must be >= 0"),
        ("max_steps=0", "max_steps must be -1"),
        ("epochs=0", "epochs must be > 0"),
        ("report_to=jsonl,mlflow", "unknown sink 'mlflow'"),
        ("adam_beta2=1", "adam_beta2 must be in [0, 1)"),
        ("lora.dropout=1.0", "lora.dropout must be in [0, 1)"),
        ("lora.r=-1", "lora.r must be >= 0"),
    ],
)
def test_validate_is_called(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, overrides=[override])
    assert fragment in str(err.value)


def test_validate_cross_field_and_subclass() -> None:
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config(TrainConfig, overrides=["max_steps=10", "warmup_steps=20"])
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        load_config(FooConfig, overrides=["beta=-1"])
    with pytest.raises(ConfigError, match="beta must be >= 0"):
        config_from_dict(FooConfig, {"beta": -1})
    with pytest.raises(ConfigError, match="inner.x must not be 13"):
        load_config(Outer, overrides=["inner.x=13"])


def test_save_load_round_trip(tmp_path: Path) -> None:
    cfg = load_config(
        FooConfig,
        overrides=[
            "lr=2e-5",
            "data=none",
            "eval_data=none",
            "output_dir=runs/x y",
            "epochs=2.5",
            "lora.r=8",
            "lora.target_modules=q_proj",
            "report_to=jsonl,wandb",
            "beta=1e-7",
            "extra={a: [1, {b: null}], 'yes': 'no'}",
            "steps_list=1,2",
            "model=1e-3",
        ],
    )
    cfg = dataclasses.replace(cfg, data="none", eval_data=None)  # the text "none" is not null
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(FooConfig, path) == cfg
    assert config_from_dict(FooConfig, config_to_dict(cfg)) == cfg
    text = path.read_text()
    keys = [line.split(":")[0] for line in text.splitlines() if line and line[0].isalpha()]
    assert keys == [f.name for f in dataclasses.fields(FooConfig)]  # field order, readable
    assert "report_to: [jsonl, wandb]" in text and "  r: 8" in text


def test_config_to_dict_is_plain_nested() -> None:
    data = config_to_dict(TrainConfig())
    assert data["lora"] == {
        "r": 0,
        "alpha": 16.0,
        "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "merge": False,
    }
    assert list(data) == [f.name for f in dataclasses.fields(TrainConfig)]
    assert to_yaml(TrainConfig()).startswith("model: tiny\n")


def test_subclass_config_and_help() -> None:
    cfg = load_config(FooConfig, overrides=["beta=0.5", "lr=3e-4", "lora.r=2"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.beta, cfg.lr, cfg.lora.r) == (0.5, 3e-4, 2)
    text = config_help(FooConfig, "foo")
    assert "posttrain foo [--config FILE.yaml] [key=value ...]" in text
    assert "test-only strength" in text and "A test-only recipe config" in text
    for key in ("beta", "lr", "max_steps", "lora.r"):
        assert any(line.split()[0] == key for line in text.splitlines() if line.strip())


def test_flatten_keys() -> None:
    options = flatten_keys(TrainConfig)
    top = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "lora"]
    nested = [f"lora.{f.name}" for f in dataclasses.fields(LoraConfig)]
    assert list(options) == top + nested  # top level first, then the group
    assert options["lora.r"].default == 0 and options["lora.r"].type is int
    assert options["lr"].help == "peak learning rate"


@pytest.mark.parametrize("cls", [TrainConfig, FooConfig, Outer])
def test_help_lists_every_key_with_type_default_help(cls: type) -> None:
    text = config_help(cls, "cmd")
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    for key, opt in flatten_keys(cls).items():
        assert key in rows, key
        assert opt.help in " ".join(text.split())
    assert "constant|linear|cosine" in text if cls is not Outer else "inner.*" in text
    lr_row = rows.get("lr")
    if lr_row:
        assert lr_row.split()[1:3] == ["float", "0.0001"]
    assert all(len(line) <= 100 for line in text.splitlines())


def test_help_aligns_help_column() -> None:
    text = config_help(TrainConfig, "sft")
    columns = {line_index(text, frag) for frag in ("peak learning rate", "LoRA rank;", "AdamW")}
    assert len(columns) == 1


def line_index(text: str, fragment: str) -> int:
    return next(line.index(fragment) for line in text.splitlines() if fragment in line)


def test_help_markup_renders_to_the_plain_text() -> None:
    from rich.console import Console

    console = Console(width=100, record=True, color_system=None)
    console.print(config_help(FooConfig, "foo", markup=True), soft_wrap=True)
    rendered = [line.rstrip() for line in console.export_text().splitlines()]
    plain = [line.rstrip() for line in config_help(FooConfig, "foo").splitlines()]
    assert rendered == plain  # brackets in [key=value ...] and list[str] survive
