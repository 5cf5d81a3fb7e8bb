import json

import pytest

from controllens.cli import _layers, main
from controllens.testing import tiny_llama, tiny_tokenizer
from tests.conftest import data_path


@pytest.mark.parametrize(
    "text, expected",
    [("3", (3,)), ("1,4,-1", (1, 4, -1)), ("2-5", (2, 3, 4, 5)), ("0-1,7", (0, 1, 7))],
)
def test_layer_lists_parse_ranges_and_negatives(text, expected):
    assert _layers(text) == expected


@pytest.fixture
def tiny_folder(tmp_path):
    folder = tmp_path / "tiny"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_steer_runs_on_a_local_model_with_text_files(tiny_folder, tmp_path, capsys):
    target, source = tmp_path / "target.txt", tmp_path / "source.txt"
    target.write_text("so good\nlovely day\n")
    source.write_text("bad one\nawful film\n")
    saved = tmp_path / "means.safetensors"
    code = main(
        [
            "steer",
            "--model",
            str(tiny_folder),
            "--target",
            str(target),
            "--source",
            str(source),
            "--kp",
            "1",
            "--ki",
            "0.1",
            "--kd",
            "0.1",
            "--alpha",
            "2",
            "--prompt",
            "ab",
            "--max-new-tokens",
            "3",
            "--save",
            str(saved),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "PID add steering" in out and "steered:" in out
    assert saved.is_file()


@pytest.mark.parametrize("method", ["rotate", "transport", "ablate"])
def test_steer_runs_every_method(tiny_folder, tmp_path, capsys, method):
    target, source = tmp_path / "target.txt", tmp_path / "source.txt"
    target.write_text("so good\nlovely day\nfine and fun\n")
    source.write_text("bad one\nawful film\na dull mess\n")
    arguments = ["steer", "--model", str(tiny_folder), "--target", str(target)]
    arguments += ["--source", str(source), "--method", method, "--alpha", "0.5"]
    code = main([*arguments, "--prompt", "ab", "--max-new-tokens", "3"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"P {method} steering" in out


def test_steer_without_data_says_what_to_give(tiny_folder, capsys):
    assert main(["steer", "--model", str(tiny_folder)]) == 2
    assert "--tsv" in capsys.readouterr().err


def test_a_missing_model_folder_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["steer", "--model", str(tmp_path / "nowhere")]) == 2
    assert "never downloads" in capsys.readouterr().err


@pytest.mark.slow
def test_the_demo_runs_end_to_end_and_writes_json_and_plot(tmp_path, capsys):
    data_path("sst2", "dev.tsv")
    code = main(
        [
            "demo",
            "--n-train",
            "8",
            "--n-val",
            "4",
            "--n-test",
            "4",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["test"]) == {"unsteered", "P", "PID"}
    assert 0 <= results["test"]["P"]["positive_rate"] <= 1
    assert (tmp_path / "layers.png").stat().st_size > 0
    assert "held-out negative SST-2 dev prompts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kp", "nan"], "kp must be finite"),
        (["--kp", "-1"], "kp must be finite and >= 0"),
        (
            ["--target", "/nonexistent/t.txt", "--source", "/nonexistent/s.txt"],
            "No such file",
        ),
    ],
    ids=["nan-gain", "gain", "missing-file"],
)
def test_bad_command_line_input_is_one_error_line(
    tiny_folder, tmp_path, capsys, extra, message
):
    target = tmp_path / "t.txt"
    target.write_text("good\nnice\n")
    data = ["--target", str(target), "--source", str(target)]
    if "--target" in extra:
        data = []
    code = main(["steer", "--model", str(tiny_folder), *data, *extra])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--positions", "middle"], "expected all, prompt, generated"),
        (["--layers", "a"], "expected layer indices"),
        (["--layers", "5-2"], "runs backwards"),
    ],
    ids=["positions", "layers", "reversed"],
)
def test_malformed_options_are_refused_by_the_parser(capsys, extra, message):
    with pytest.raises(SystemExit):
        main(["steer", *extra])
    assert message in capsys.readouterr().err
