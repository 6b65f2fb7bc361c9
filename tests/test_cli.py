"""The `glmchat` console script, run as a user runs it: a subprocess, stdin and stdout."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest

import glmchat

GLMCHAT = shutil.which("glmchat")
pytestmark = pytest.mark.skipif(GLMCHAT is None, reason="the console script is missing: pip install -e .")
COMMON = ["--device", "cpu", "--dtype", "float32", "--greedy", "--max-new-tokens", "12"]


def glmchat_cli(*args, stdin: str = "", env: dict | None = None, check: bool = True):
    result = subprocess.run([GLMCHAT, *map(str, args)], input=stdin, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def native(tiny_ckpt):
    return glmchat.load(str(tiny_ckpt), device="cpu", dtype="float32", progress=False)


def _answer(native, messages):
    return native.chat(messages, greedy=True, max_new_tokens=12)


def test_help_lists_every_command():
    out = glmchat_cli("--help").stdout
    for command in ("chat", "run", "serve", "bench", "quantize"):
        assert command in out
    assert "--random-weights" in glmchat_cli("run", "--help").stdout


def test_run_prints_the_native_answer(tiny_ckpt, native):
    query = "在Python中实现二分查找的代码 请提供答案，并使用中文语言"
    result = glmchat_cli("run", "--model", tiny_ckpt, *COMMON, query)
    reply = _answer(native, [{"role": "user", "content": query}])
    shown = reply.text if reply.tool_call is None or reply.text else json.dumps(reply.tool_call, ensure_ascii=False)
    assert result.stdout == shown + "\n"


def test_run_json_and_stdin(tiny_ckpt, native):
    query = "What is ChatGLM? .Provide answer in English"
    data = json.loads(glmchat_cli("run", "--model", tiny_ckpt, *COMMON, "--json", "-", stdin=query).stdout)
    reply = _answer(native, [{"role": "user", "content": query}])
    assert data["text"] == reply.text and data["tool_call"] == reply.tool_call
    assert data["prompt_tokens"] == reply.prompt_tokens and data["completion_tokens"] == reply.completion_tokens
    assert data["finish_reason"] in ("stop", "length") and data["random_weights"] is False
    assert data["tokens_per_second"] > 0 and data["load_seconds"] > 0 and data["time_to_first_token"] > 0


def test_interactive_chat_keeps_history_and_obeys_commands(tiny_ckpt, native):
    stdin = "Hello\n你好，请介绍一下你自己\n/system Be brief.\n/clear\n/help\nHello\n/quit\n"
    result = glmchat_cli("chat", "--model", tiny_ckpt, *COMMON, stdin=stdin)
    out = result.stdout
    first = _answer(native, [{"role": "user", "content": "Hello"}])
    history = [{"role": "user", "content": "Hello"}, *first.messages]
    second = _answer(native, history + [{"role": "user", "content": "你好，请介绍一下你自己"}])
    after_clear = _answer(native, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert out.index(first.text) < out.index(second.text) < out.index("(conversation cleared)")
    assert after_clear.text in out[out.index("/quit leave"):]
    assert "(system prompt set)" in out and out.count("tokens/s") == 3
    assert re.search(r"loaded .* in \d+\.\d s", result.stderr)  # the load time


def test_eof_ends_the_chat_cleanly(tiny_ckpt):
    assert glmchat_cli("chat", "--model", tiny_ckpt, *COMMON, stdin="").returncode == 0


def test_user_mistakes_get_one_line_and_nonzero_exit(tiny_ckpt, tmp_path):
    missing = glmchat_cli("run", "--model", tmp_path / "nope", "hi", check=False)
    assert missing.returncode != 0 and "no checkpoint directory" in missing.stderr
    offline = glmchat_cli("run", "--model", "THUDM/not-here", "hi", check=False,
                          env={"HF_HOME": str(tmp_path / "hf")})
    assert offline.returncode != 0 and "THUDM/not-here" in offline.stderr and "hub" in offline.stderr
    bad_option = glmchat_cli("run", "--model", tiny_ckpt, "--temperature", "-1", "hi", check=False)
    assert bad_option.returncode == 2 and "--temperature" in bad_option.stderr
    too_long = glmchat_cli("run", "--model", tiny_ckpt, *COMMON, "长" * 2000, check=False)
    assert too_long.returncode != 0 and "context" in too_long.stderr
    for result in (missing, offline, bad_option, too_long):
        assert len(result.stderr.strip().splitlines()) <= 2, result.stderr


def test_damaged_checkpoints_get_one_line_and_nonzero_exit(tiny_ckpt, tiny_ckpt_bin, tmp_path):
    typed = tmp_path / "typed"
    shutil.copytree(tiny_ckpt, typed)
    config = json.loads((typed / "config.json").read_text())
    (typed / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))
    result = glmchat_cli("run", "--model", typed, *COMMON, "hi", check=False)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f'glmchat: error: {typed / "config.json"}: hidden_size="big" must be an integer']

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_ckpt_bin, damaged)
    shard = sorted(damaged.glob("pytorch_model-*.bin"))[0]
    shard.write_bytes(pickle.dumps({"transformer.embedding.word_embeddings.weight": len}))  # a pickle, no tensors
    result = glmchat_cli("run", "--model", damaged, *COMMON, "hi", check=False)
    [line] = result.stderr.strip().splitlines()
    assert result.returncode == 1 and f"{shard.name} is damaged or not a plain weights file" in line
    assert "weights_only" not in line


def test_input_that_is_not_utf8_gets_one_line(tiny_ckpt):
    """Bytes that are not UTF-8 (kept by Python as lone surrogates) cannot be tokenized: say so."""
    run = subprocess.run([GLMCHAT, "run", "--model", str(tiny_ckpt), *COMMON], input=b"hi \xff\n",
                         capture_output=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 1 and run.stderr.decode().strip().splitlines() == [
        "glmchat: error: the query is not valid UTF-8 text"]
    chat = subprocess.run([GLMCHAT, "chat", "--model", str(tiny_ckpt), *COMMON], input=b"hi \xff\nhello\n",
                          capture_output=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert chat.returncode == 0 and b"Traceback" not in chat.stderr
    assert b"that line is not valid UTF-8 text" in chat.stdout and chat.stdout.count(b"tokens in") == 1


def test_help_version_and_option_errors_do_not_import_torch():
    """Seconds saved: torch is imported by the commands that need it, not by the entry point."""
    code = ("import sys, runpy; sys.argv = ['glmchat', *sys.argv[1:]]\n"
            "try:\n    from glmchat.cli import main; main()\n"
            "finally:\n    print('torch' in sys.modules, file=sys.stderr)")
    for args, status in ((["--help"], 0), (["--version"], 0), (["run", "--help"], 0), (["serve", "--help"], 0),
                         (["run", "--top-p", "5", "hi"], 2), (["nope"], 2)):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == status and result.stderr.splitlines()[-1] == "False", (args, result.stderr)
    assert glmchat_cli("--version").stdout.strip() == f"glmchat {glmchat.__version__}"


def test_random_weights_say_the_text_is_meaningless(tiny_ckpt):
    result = glmchat_cli("run", "--model", tiny_ckpt, "--random-weights", *COMMON, "--json", "hi")
    assert "meaningless" in result.stderr
    assert json.loads(result.stdout)["random_weights"] is True


def test_bench_json_runs_the_seed_workload(tiny_ckpt):
    data = json.loads(glmchat_cli("bench", "--model", tiny_ckpt, "--random-weights", "--dtype", "float32",
                                  "--max-new-tokens", "3", "--json").stdout)
    prompts = [row["prompt"] for row in data["prompts"]]
    assert len(prompts) == 8 and prompts[0].endswith(" .Provide answer in English")
    assert prompts[1].endswith(" 请提供答案，并使用中文语言")
    assert all(row["generated_tokens"] == 3 for row in data["prompts"])  # random weights: stops ignored
    assert data["total"]["generated_tokens"] == 24 and data["peak_rss_bytes"] > 0


def test_quantized_checkpoint_saves_and_chats(tiny_ckpt, tmp_path):
    out = tmp_path / "int8"
    glmchat_cli("quantize", tiny_ckpt, out, "--bits", "8")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["method"] == "int8"
    assert config["torch_dtype"] == "bfloat16"  # --dtype auto: what this (CPU) machine loads, so it loads in place
    data = json.loads(glmchat_cli("run", "--model", out, *COMMON, "--json", "Hello").stdout)
    assert data["completion_tokens"] > 0


def test_run_and_chat_answer_with_chatglm_6b(chatglm6b_ckpt):
    """The original ChatGLM-6B from the command line: one answer, and a second turn after it."""
    expected = glmchat.load(str(chatglm6b_ckpt), device="cpu", dtype="float32", progress=False)
    first = expected.chat([{"role": "user", "content": "你好"}], greedy=True, max_new_tokens=12)
    data = json.loads(glmchat_cli("run", "--model", chatglm6b_ckpt, *COMMON, "--json", "你好").stdout)
    assert data["text"] == first.text and data["prompt_tokens"] == first.prompt_tokens
    second = expected.chat([{"role": "user", "content": "你好"}, *first.messages, {"role": "user", "content": "Hi"}],
                           greedy=True, max_new_tokens=12)
    out = glmchat_cli("chat", "--model", chatglm6b_ckpt, *COMMON, stdin="你好\nHi\n").stdout
    assert first.text.strip() and second.text.strip() and first.text in out and second.text in out
