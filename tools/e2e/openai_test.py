#!/usr/bin/env python3
"""End-to-end tests of `qwen2vl serve` with the official `openai` Python client.

Starts the debug `qwen2vl serve` on the tiny random-weight fixture model (twice: a plain
server with --api-key, and one whose answers are scripted by the debug-only
QWEN2VL_TEST_SCRIPTED_ANSWER hook, for tool calls), talks to them only through
`openai.OpenAI`, and checks what a client sees: models, greedy answers (also against
`qwen2vl run`), streaming with usage, image token counts from Qwen2-VL's resize rule,
tool calls, errors, n.

Run it with tools/e2e/openai_test.sh (makes the venv, pins `openai` and `tokenizers`, builds
the CLI). Directly: `python tools/e2e/openai_test.py [-v] [Test.name]` with those packages
installed; QWEN2VL_BIN overrides the binary (default target/debug/qwen2vl).
"""

import atexit
import base64
import ctypes
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import unittest

import openai
from tokenizers import Tokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.environ.get("QWEN2VL_BIN", os.path.join(ROOT, "target", "debug", "qwen2vl"))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-qwen2vl")
IMAGES = os.path.join(ROOT, "tests", "fixtures", "images")
MODEL_NAME = "tiny-e2e"
API_KEY = "e2e-secret"
START_TIMEOUT = 120

TOOL_CALL_ANSWER = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}

# The processor's limits (tests/fixtures/tiny-qwen2vl/preprocessor_config.json).
with open(os.path.join(MODEL, "preprocessor_config.json")) as f:
    _PRE = json.load(f)
MIN_PIXELS = _PRE["min_pixels"]
MAX_PIXELS = _PRE["max_pixels"]
FACTOR = _PRE["patch_size"] * _PRE["merge_size"]  # 28

TOKENIZER = Tokenizer.from_file(os.path.join(MODEL, "tokenizer.json"))


# ---------------------------------------------------------------------------------------
# What the server should count, computed here independently of it.


def chat_prompt(user_content):
    """Qwen2-VL's chat template for one user message (the default system message added)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n{user_content}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def count_tokens(text):
    return len(TOKENIZER.encode(text, add_special_tokens=False).ids)


def smart_resize(height, width, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Qwen2-VL's resize (transformers' qwen2_vl image processor, Python's round included):
    each side a multiple of 28, the area within [min_pixels, max_pixels]."""
    h_bar = max(FACTOR, round(height / FACTOR) * FACTOR)
    w_bar = max(FACTOR, round(width / FACTOR) * FACTOR)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w_bar = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / FACTOR) * FACTOR
        w_bar = math.ceil(width * beta / FACTOR) * FACTOR
    return h_bar, w_bar


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def image_tokens(path, **pixels):
    width, height = png_size(path)
    h, w = smart_resize(height, width, **pixels)
    return (h // FACTOR) * (w // FACTOR)


def data_uri(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


# ---------------------------------------------------------------------------------------
# Servers.


def _die_with_parent():
    """In the child: SIGTERM when this test process dies, even by SIGKILL (Linux)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """`qwen2vl serve --port 0` as a subprocess; the address is read from its stderr."""

    def __init__(self, *args, env=None):
        self.log = tempfile.NamedTemporaryFile(
            mode="w+", prefix="qwen2vl-e2e-", suffix=".log", delete=False
        )
        cmd = [BIN, "serve", "--model", MODEL, "--served-model-name", MODEL_NAME,
               "--host", "127.0.0.1", "--port", "0", *args]
        full_env = dict(os.environ)
        full_env.pop("QWEN2VL_API_KEY", None)
        full_env.pop("QWEN2VL_TEST_SCRIPTED_ANSWER", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=full_env,
            preexec_fn=_die_with_parent,
        )
        self.base_url = None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with open(self.log.name) as f:
                m = re.search(r"serving \S+ on (http://\S+)", f.read())
            if m:
                self.base_url = m.group(1) + "/v1"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{' '.join(cmd)} did not start:\n{self.output()}")

    def output(self):
        with open(self.log.name) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass

    def client(self, api_key=API_KEY):
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0,
                             timeout=300)


SERVERS = {}
atexit.register(lambda: tearDownModule())


def setUpModule():
    if not os.access(BIN, os.X_OK):
        raise RuntimeError(f"{BIN} is missing: cargo build -p qwen2vl-cli")
    try:
        SERVERS["plain"] = Server("--api-key", API_KEY, "--max-running", "4")
        SERVERS["scripted"] = Server(
            "--api-key", API_KEY, env={"QWEN2VL_TEST_SCRIPTED_ANSWER": TOOL_CALL_ANSWER}
        )
    except BaseException:
        tearDownModule()
        raise


def tearDownModule():
    for s in SERVERS.values():
        s.stop()
    SERVERS.clear()


def user_text(text):
    return [{"role": "user", "content": text}]


def streamed(stream):
    """(content, chunks) of a streamed answer, first choice."""
    chunks = list(stream)
    content = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices
    )
    return content, chunks


def run_cli(prompt, max_tokens, *extra):
    """What `qwen2vl run` prints for the prompt, and its --json object."""
    cmd = [BIN, "run", "-q", "--model", MODEL, "--temperature", "0",
           "--max-new-tokens", str(max_tokens), *extra]
    plain = subprocess.run(cmd + [prompt], capture_output=True, text=True, check=True)
    js = subprocess.run(cmd + ["--json", prompt], capture_output=True, text=True, check=True)
    return plain.stdout, json.loads(js.stdout)


# ---------------------------------------------------------------------------------------


class OpenAIClientTest(unittest.TestCase):
    maxDiff = None

    @classmethod
    def setUpClass(cls):
        cls.client = SERVERS["plain"].client()

    def greedy(self, messages, max_tokens, **kw):
        return self.client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0, **kw
        )

    def check_usage(self, usage, prompt_tokens, image_tokens=0, max_tokens=None):
        self.assertEqual(usage.prompt_tokens, prompt_tokens)
        self.assertEqual(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens)
        if max_tokens is not None:
            self.assertTrue(1 <= usage.completion_tokens <= max_tokens, usage)
        # openai's typed PromptTokensDetails keeps the server's extra fields.
        self.assertIsNotNone(usage.prompt_tokens_details, usage)
        details = usage.prompt_tokens_details.model_dump()
        self.assertEqual(details.get("image_tokens"), image_tokens, details)
        self.assertEqual(details.get("text_tokens"), prompt_tokens - image_tokens, details)

    def test_models_list(self):
        ids = [m.id for m in self.client.models.list()]
        self.assertEqual(ids, [MODEL_NAME])

    def test_greedy_text_completion_matches_the_cli(self):
        prompt, max_tokens = "Write one sentence about the sea.", 10
        r = self.greedy(user_text(prompt), max_tokens)
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.model, MODEL_NAME)
        self.assertEqual(len(r.choices), 1)
        choice = r.choices[0]
        self.assertEqual(choice.message.role, "assistant")
        content = choice.message.content
        self.assertIsInstance(content, str)
        self.assertIn(choice.finish_reason, {"stop", "length"})
        self.assertFalse(choice.message.tool_calls)
        expected_prompt = count_tokens(chat_prompt(prompt))
        self.check_usage(r.usage, expected_prompt, max_tokens=max_tokens)
        if choice.finish_reason == "length":
            self.assertEqual(r.usage.completion_tokens, max_tokens)

        # Greedy: the same request gives the same answer.
        again = self.greedy(user_text(prompt), max_tokens)
        self.assertEqual(again.choices[0].message.content, content)
        self.assertEqual(again.usage.completion_tokens, r.usage.completion_tokens)

        # And `qwen2vl run` prints the same answer for the same prompt.
        printed, js = run_cli(prompt, max_tokens)
        self.assertEqual(printed, content + "\n")
        self.assertEqual(js["text"], content)
        self.assertEqual(js["finish_reason"], choice.finish_reason)
        self.assertEqual(js["usage"]["prompt_tokens"], expected_prompt)
        self.assertEqual(js["usage"]["completion_tokens"], r.usage.completion_tokens)

    def test_stream_with_usage_equals_the_whole_answer(self):
        prompt, max_tokens = "Tell me a story about a fox.", 16
        whole = self.greedy(user_text(prompt), max_tokens)
        stream = self.greedy(user_text(prompt), max_tokens, stream=True,
                             stream_options={"include_usage": True})
        content, chunks = streamed(stream)
        self.assertEqual(content, whole.choices[0].message.content)
        self.assertGreater(len(chunks), 2)
        ids = {c.id for c in chunks}
        self.assertEqual(len(ids), 1, ids)
        finishes = [c.choices[0].finish_reason for c in chunks
                    if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, [whole.choices[0].finish_reason])
        # Usage comes once, in the last chunk, which has no choices.
        last = chunks[-1]
        self.assertEqual(last.choices, [])
        self.assertIsNotNone(last.usage)
        self.assertTrue(all(c.usage is None for c in chunks[:-1]))
        self.assertSameUsageRepeated(last.usage, whole.usage)
        self.check_usage(last.usage, count_tokens(chat_prompt(prompt)), max_tokens=max_tokens)

        # Without include_usage no chunk carries usage.
        _, chunks = streamed(self.greedy(user_text(prompt), max_tokens, stream=True))
        self.assertTrue(all(c.usage is None for c in chunks))

    def assertSameUsageRepeated(self, again, first):
        """`again` is the usage of a request repeating `first`'s prompt: the same counts,
        except that the prefix cache now serves part of the prompt (cached_tokens, which the
        first request may also have had from an earlier test)."""
        a, f = again.model_dump(), first.model_dump()
        cached = a["prompt_tokens_details"].pop("cached_tokens")
        f["prompt_tokens_details"].pop("cached_tokens")
        self.assertEqual(a, f)
        self.assertGreater(cached, 0, "a repeated prompt reuses the prefix cache")
        self.assertLess(cached, a["prompt_tokens"], "at least one position is prefilled")

    def image_request(self, name, max_tokens, text, stream=False, **pixels):
        part = {"type": "image_url", "image_url": {"url": data_uri(os.path.join(IMAGES, name))}}
        part.update(pixels)  # min_pixels / max_pixels: Qwen2-VL's per-image extras
        messages = [{"role": "user", "content": [part, {"type": "text", "text": text}]}]
        kw = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        return self.greedy(messages, max_tokens, **kw)

    def test_image_data_uri_token_count(self):
        text, max_tokens = "What is in this picture?", 6
        cases = [
            ("wide.png", {}),  # 300x200: rounded to 308x196
            ("tiny20.png", {}),  # 20x20: below min_pixels, scaled up
            ("photo640.png", {"max_pixels": 64 * 28 * 28}),  # above max_pixels, scaled down
        ]
        for name, pixels in cases:
            with self.subTest(image=name, **pixels):
                path = os.path.join(IMAGES, name)
                n_image = image_tokens(path, **pixels)
                # The template's one <|image_pad|> becomes n_image pads.
                expected = count_tokens(chat_prompt(
                    f"<|vision_start|><|image_pad|><|vision_end|>{text}")) - 1 + n_image
                r = self.image_request(name, max_tokens, text, **pixels)
                content = r.choices[0].message.content
                self.assertIsInstance(content, str)
                self.check_usage(r.usage, expected, image_tokens=n_image,
                                 max_tokens=max_tokens)
                s_content, chunks = streamed(
                    self.image_request(name, max_tokens, text, stream=True, **pixels))
                self.assertEqual(s_content, content)
                self.assertSameUsageRepeated(chunks[-1].usage, r.usage)
                if not pixels:
                    printed, js = run_cli(text, max_tokens, "--image", path)
                    self.assertEqual(js["text"], content)
                    self.assertEqual(js["usage"]["prompt_image_tokens"], n_image)
                    self.assertEqual(js["usage"]["prompt_tokens"], expected)

    def test_n_two_choices(self):
        r = self.client.chat.completions.create(
            model=MODEL_NAME, messages=user_text("Name a colour."), max_tokens=5, n=2,
            temperature=1.0, seed=7,
        )
        self.assertEqual(sorted(c.index for c in r.choices), [0, 1])
        for c in r.choices:
            self.assertIsInstance(c.message.content, str)
            self.assertIn(c.finish_reason, {"stop", "length"})
        self.assertEqual(r.usage.prompt_tokens, count_tokens(chat_prompt("Name a colour.")))
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)
        self.assertTrue(2 <= r.usage.completion_tokens <= 10, r.usage)
        # Streamed: both choices stream and each finishes once.
        chunks = list(self.client.chat.completions.create(
            model=MODEL_NAME, messages=user_text("Name a colour."), max_tokens=5, n=2,
            stream=True))
        finished = sorted(ch.index for c in chunks for ch in c.choices if ch.finish_reason)
        self.assertEqual(finished, [0, 1])

    def test_negative_temperature_is_a_bad_request_naming_it(self):
        with self.assertRaises(openai.BadRequestError) as cm:
            self.client.chat.completions.create(
                model=MODEL_NAME, messages=user_text("hi"), max_tokens=2, temperature=-1)
        e = cm.exception
        self.assertEqual(e.status_code, 400)
        body = e.body.get("error", e.body) if isinstance(e.body, dict) else {}
        self.assertEqual(body.get("param"), "temperature", e.body)
        self.assertEqual(body.get("type"), "invalid_request_error", e.body)
        self.assertIn("temperature", body.get("message", ""))
        self.assertEqual(e.param, "temperature")

    def test_other_bad_requests(self):
        cases = [
            (dict(n=0), "n"),
            (dict(top_p=1.5), "top_p"),
            (dict(max_tokens=0), "max_tokens"),
        ]
        for kw, param in cases:
            with self.subTest(**kw):
                args = dict(model=MODEL_NAME, messages=user_text("hi"), max_tokens=2)
                args.update(kw)
                with self.assertRaises(openai.BadRequestError) as cm:
                    self.client.chat.completions.create(**args)
                self.assertEqual(cm.exception.param, param, cm.exception.body)

    def test_wrong_api_key_is_an_authentication_error(self):
        for key in ["wrong", API_KEY + "x"]:
            bad = SERVERS["plain"].client(api_key=key)
            with self.assertRaises(openai.AuthenticationError) as cm:
                bad.chat.completions.create(
                    model=MODEL_NAME, messages=user_text("hi"), max_tokens=2)
            self.assertEqual(cm.exception.status_code, 401)
            self.assertEqual(cm.exception.code, "invalid_api_key")
            with self.assertRaises(openai.AuthenticationError):
                bad.models.list()


class ToolCallTest(unittest.TestCase):
    """The scripted server answers every request with TOOL_CALL_ANSWER."""

    @classmethod
    def setUpClass(cls):
        cls.client = SERVERS["scripted"].client()

    def ask(self, **kw):
        return self.client.chat.completions.create(
            model=MODEL_NAME, messages=user_text("What is the weather in Paris?"),
            max_tokens=8, temperature=0, **kw)

    def test_tool_call(self):
        r = self.ask(tools=[WEATHER_TOOL])
        choice = r.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertIn(choice.message.content, (None, ""))
        self.assertEqual(len(choice.message.tool_calls), 1)
        call = choice.message.tool_calls[0]
        self.assertEqual(call.type, "function")
        self.assertTrue(call.id)
        self.assertEqual(call.function.name, "get_weather")
        self.assertEqual(json.loads(call.function.arguments), {"city": "Paris"})
        # The prompt holds the tools' system section: more tokens than without tools.
        plain = count_tokens(chat_prompt("What is the weather in Paris?"))
        self.assertGreater(r.usage.prompt_tokens, plain)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)

        # Streamed: the same call through delta.tool_calls, and no <tool_call> text.
        chunks = list(self.ask(tools=[WEATHER_TOOL], stream=True,
                               stream_options={"include_usage": True}))
        calls = {}
        text = ""
        finishes = []
        for c in chunks:
            if not c.choices:
                continue
            d = c.choices[0].delta
            text += d.content or ""
            if c.choices[0].finish_reason:
                finishes.append(c.choices[0].finish_reason)
            for tc in d.tool_calls or []:
                acc = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                acc["id"] = tc.id or acc["id"]
                if tc.function is not None:
                    acc["name"] += tc.function.name or ""
                    acc["arguments"] += tc.function.arguments or ""
        self.assertEqual(finishes, ["tool_calls"])
        self.assertNotIn("<tool_call>", text)
        self.assertEqual(text.strip(), "")
        self.assertEqual(list(calls), [0])
        self.assertTrue(calls[0]["id"])
        self.assertEqual(calls[0]["name"], "get_weather")
        self.assertEqual(json.loads(calls[0]["arguments"]), {"city": "Paris"})
        self.assertEqual(chunks[-1].usage.prompt_tokens, r.usage.prompt_tokens)

    def test_without_tools_the_call_is_text(self):
        r = self.ask()
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(r.choices[0].message.content, TOOL_CALL_ANSWER)
        self.assertFalse(r.choices[0].message.tool_calls)
        self.assertEqual(r.usage.prompt_tokens,
                         count_tokens(chat_prompt("What is the weather in Paris?")))


if __name__ == "__main__":
    unittest.main()
