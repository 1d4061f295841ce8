"""The official `openai` Python client against a running kubetune-server: a second check of the
wire format, independent of the Rust tests (server/tests/server/compat.rs), which build their
requests and read the answers by hand.

The client runs with `_strict_response_validation=True`, so every answer, stream chunks
included, is validated against the client's own pydantic types (a field of the wrong type or
an unknown `finish_reason` fails the test, where the default client would let it pass).

e2e/openai-client.sh starts the server and runs this; alone:

    KUBETUNE_OPENAI_BASE_URL=http://127.0.0.1:8000/v1 KUBETUNE_OPENAI_MODEL=tiny \
    KUBETUNE_OPENAI_ADAPTER=ada KUBETUNE_OPENAI_API_KEY=KEY python -m unittest -v test_client

with the server serving the adapter (`--adapter ada=DIR`, written by write_adapter.py) at
version 1, and requiring KEY (`--api-keys-file`).
"""

import asyncio
import os
import re
import typing
import unittest

import openai
import pydantic
from openai import AsyncOpenAI, OpenAI

BASE_URL = os.environ["KUBETUNE_OPENAI_BASE_URL"]
BASE = os.environ["KUBETUNE_OPENAI_MODEL"]
ADAPTER = os.environ["KUBETUNE_OPENAI_ADAPTER"]
API_KEY = os.environ["KUBETUNE_OPENAI_API_KEY"]
# The server's request body limit (server/src/api/fields.rs MAX_BODY_BYTES).
MAX_BODY_BYTES = 2 << 20
GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


def client(**kw):
    options = {"base_url": BASE_URL, "api_key": API_KEY, "max_retries": 0, "timeout": 120}
    return OpenAI(**{**options, "_strict_response_validation": True, **kw})


def chat_body(content="Hello there", **kw):
    """A greedy chat request of at most 8 tokens; `kw` adds or overrides fields."""
    return {"model": BASE, "messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0, **kw}


class OpenAIClient(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.client = client()

    @classmethod
    def tearDownClass(cls):
        cls.client.close()

    def other_client(self, **kw):
        """A client with other options, closed when the test ends."""
        c = client(**kw)
        self.addCleanup(c.close)
        return c

    def assert_usage(self, usage, completion_tokens_at_most):
        self.assertGreater(usage.prompt_tokens, 0)
        self.assertGreaterEqual(usage.completion_tokens, 1)
        self.assertLessEqual(usage.completion_tokens, completion_tokens_at_most)
        self.assertEqual(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens)

    def assert_same_counts(self, usage, other):
        """The same token counts. Whole usage objects differ in `cached_tokens` when the later
        request found the earlier one's prompt blocks in the prefix cache."""
        counts = lambda u: (u.prompt_tokens, u.completion_tokens, u.total_tokens)  # noqa: E731
        self.assertEqual(counts(usage), counts(other))

    def assert_refused(self, err, status, code, param):
        """OpenAI's error object as the client reads it: status, code, param, type, message."""
        self.assertEqual(err.status_code, status, err.body)
        self.assertEqual(err.code, code, err.body)
        self.assertEqual(err.param, param, err.body)
        self.assertEqual(err.type, "invalid_request_error", err.body)
        self.assertTrue(err.message, err.body)
        self.assertRegex(err.request_id or "", GENERATED_ID, "errors carry X-Request-Id too")

    # -- models -----------------------------------------------------------------------------

    def test_models_list_and_retrieve(self):
        models = list(self.client.models.list())
        self.assertEqual([m.id for m in models], [BASE, ADAPTER])
        for m in models:
            self.assertEqual(m.object, "model")
            self.assertIsInstance(m.created, int)
            self.assertGreater(m.created, 1_600_000_000)
            self.assertEqual(m.owned_by, "kubetune")
            one = self.client.models.retrieve(m.id)
            self.assertEqual(one.to_dict(), m.to_dict(), "retrieve returns the listed entry")
        # The adapter's entry carries what the operator checks, as extra fields.
        adapter = models[1].to_dict()
        self.assertEqual(adapter["version"], 1)
        self.assertEqual(adapter["parent"], BASE)
        self.assertRegex(adapter["digest"], r"^sha256:[0-9a-f]{64}$")

    def test_an_unknown_model_is_not_found(self):
        with self.assertRaises(openai.NotFoundError) as e:
            self.client.models.retrieve("no-such-model")
        self.assert_refused(e.exception, 404, "model_not_found", "model")
        for model in ["no-such-model", f"{ADAPTER}@7"]:
            with self.assertRaises(openai.NotFoundError) as e:
                self.client.chat.completions.create(**{**chat_body(), "model": model})
            self.assert_refused(e.exception, 404, "model_not_found", "model")
            with self.assertRaises(openai.NotFoundError) as e:
                self.client.completions.create(model=model, prompt="hi", max_tokens=2)
            self.assert_refused(e.exception, 404, "model_not_found", "model")

    # -- chat -------------------------------------------------------------------------------

    def test_chat_completion(self):
        r = self.client.chat.completions.create(**chat_body())
        self.assertEqual(r.object, "chat.completion")
        self.assertTrue(r.id.startswith("chatcmpl-"), r.id)
        self.assertEqual(r.model, BASE)
        self.assertGreater(r.created, 1_600_000_000)
        self.assertEqual(len(r.choices), 1)
        c = r.choices[0]
        self.assertEqual(c.index, 0)
        self.assertEqual(c.message.role, "assistant")
        self.assertIsInstance(c.message.content, str)
        self.assertIn(c.finish_reason, ("stop", "length"))
        self.assertIsNone(c.logprobs, "no logprobs unless asked")
        self.assert_usage(r.usage, 8)
        # Greedy is deterministic.
        again = self.client.chat.completions.create(**chat_body())
        self.assertEqual(again.choices[0].message.content, c.message.content)
        self.assertNotEqual(again.id, r.id)
        # The newer name of the limit, and the client's typed content parts.
        parts = self.client.chat.completions.create(
            model=BASE,
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}
            ],
            max_completion_tokens=8,
            temperature=0,
        )
        self.assertEqual(parts.choices[0].message.content, c.message.content)
        self.assert_same_counts(parts.usage, r.usage)

    def test_a_developer_message_is_a_system_message(self):
        def answer(role):
            return self.client.chat.completions.create(
                model=BASE,
                temperature=0,
                max_tokens=8,
                messages=[{"role": role, "content": "Answer in one word."}, {"role": "user", "content": "Hello there"}],
            )

        developer, system, user = answer("developer"), answer("system"), answer("user")
        self.assertEqual(developer.choices[0].message.content, system.choices[0].message.content)
        # The same prompt tokens; the second request finds the first one's full blocks in the prefix cache.
        self.assertEqual(
            (developer.usage.prompt_tokens, developer.usage.completion_tokens),
            (system.usage.prompt_tokens, system.usage.completion_tokens),
        )
        self.assertEqual(developer.usage.prompt_tokens_details.cached_tokens, 0)
        self.assertGreater(system.usage.prompt_tokens_details.cached_tokens, 0)
        self.assertNotEqual(
            developer.choices[0].message.content,
            user.choices[0].message.content,
            "the role must change the output, or this test proves nothing",
        )

    def test_streamed_chat_ends_with_usage_in_a_chunk_without_choices(self):
        whole = self.client.chat.completions.create(**chat_body(max_tokens=12))
        chunks = list(
            self.client.chat.completions.create(
                **chat_body(max_tokens=12), stream=True, stream_options={"include_usage": True}
            )
        )
        *choice_chunks, last = chunks
        self.assertEqual(last.choices, [])
        self.assert_same_counts(last.usage, whole.usage)
        self.assertGreaterEqual(len(choice_chunks), 1)
        for chunk in choice_chunks:
            self.assertEqual(chunk.object, "chat.completion.chunk")
            self.assertEqual(chunk.id, last.id, "one completion id")
            self.assertIsNone(chunk.usage)
            self.assertEqual(len(chunk.choices), 1)
        self.assertEqual(choice_chunks[0].choices[0].delta.role, "assistant")
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in choice_chunks),
            whole.choices[0].message.content,
        )
        finishes = [c.choices[0].finish_reason for c in choice_chunks]
        self.assertEqual(finishes[-1], whole.choices[0].finish_reason)
        self.assertTrue(all(f is None for f in finishes[:-1]), finishes)

        # Without include_usage: no usage anywhere, every chunk has its choice.
        plain = list(self.client.chat.completions.create(**chat_body(max_tokens=12), stream=True))
        self.assertTrue(all(c.usage is None and len(c.choices) == 1 for c in plain))
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in plain), whole.choices[0].message.content
        )

    def test_n_choices(self):
        body = chat_body("Hi", max_tokens=8, temperature=1.0, seed=3, n=2)
        r = self.client.chat.completions.create(**body)
        self.assertEqual([c.index for c in r.choices], [0, 1])
        texts = [c.message.content for c in r.choices]
        self.assertNotEqual(texts[0], texts[1], "sampled choices differ")
        one = self.client.chat.completions.create(**{**body, "n": 1})
        self.assertEqual(r.usage.prompt_tokens, one.usage.prompt_tokens, "the prompt counted once")
        # Streamed with the same seed: the same text per index, and the usage of both.
        streamed = ["", ""]
        usage = None
        for chunk in self.client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
            if not chunk.choices:
                usage = chunk.usage
                continue
            (c,) = chunk.choices
            streamed[c.index] += c.delta.content or ""
        self.assertEqual(streamed, texts)
        self.assert_same_counts(usage, r.usage)

    def test_chat_logprobs(self):
        r = self.client.chat.completions.create(
            **chat_body("Tell me about cafés", max_tokens=10), logprobs=True, top_logprobs=2
        )
        c = r.choices[0]
        content = c.logprobs.content
        self.assertEqual(len(content), r.usage.completion_tokens)
        spelled = bytearray()
        for t in content:
            self.assertLessEqual(t.logprob, 0.0)
            self.assertEqual(len(t.top_logprobs), 2)
            self.assertGreaterEqual(t.top_logprobs[0].logprob, t.top_logprobs[1].logprob, "most likely first")
            # Greedy: the chosen token is the most likely one.
            self.assertEqual(t.top_logprobs[0].token, t.token)
            self.assertAlmostEqual(t.top_logprobs[0].logprob, t.logprob, places=5)
            spelled += bytes(t.bytes)
        self.assertEqual(spelled.decode("utf-8", errors="replace"), c.message.content, "the bytes spell the message")

        # Streamed: the same tokens, split over the chunks.
        streamed = []
        for chunk in self.client.chat.completions.create(
            **chat_body("Tell me about cafés", max_tokens=10), logprobs=True, top_logprobs=2, stream=True
        ):
            streamed += chunk.choices[0].logprobs.content
        # The second request reuses the first one's cached prompt blocks (prefix caching), so
        # its log-probabilities may differ in the last float digits: same tokens, close values.
        self.assertEqual([(t.token, t.bytes) for t in streamed], [(t.token, t.bytes) for t in content])
        for s, w in zip(streamed, content):
            self.assertAlmostEqual(s.logprob, w.logprob, places=4)
            self.assertEqual([a.token for a in s.top_logprobs], [a.token for a in w.top_logprobs])

    # -- completions ------------------------------------------------------------------------

    def test_completion(self):
        r = self.client.completions.create(model=BASE, prompt="Once upon a time", max_tokens=6, temperature=0)
        self.assertEqual(r.object, "text_completion")
        self.assertTrue(r.id.startswith("cmpl-"), r.id)
        self.assertEqual(r.model, BASE)
        (c,) = r.choices
        self.assertEqual(c.index, 0)
        self.assertIsInstance(c.text, str)
        self.assertIn(c.finish_reason, ("stop", "length"))
        self.assertIsNone(c.logprobs)
        self.assert_usage(r.usage, 6)
        # Streamed: the same text; usage last, alone. Not validated strictly: the client types
        # a completions chunk as a whole `Completion`, whose finish_reason may not be null,
        # yet OpenAI's own streams send null until the last chunk, as this server does.
        *pieces, last = self.other_client(_strict_response_validation=False).completions.create(
            model=BASE, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
        self.assertEqual(last.choices, [])
        self.assert_same_counts(last.usage, r.usage)
        self.assertEqual("".join(p.choices[0].text for p in pieces), c.text)
        finishes = [p.choices[0].finish_reason for p in pieces]
        self.assertEqual(finishes, [None] * (len(pieces) - 1) + [c.finish_reason])
        # A prompt of token ids.
        ids = self.client.completions.create(model=BASE, prompt=[5, 17, 42], max_tokens=3, temperature=0)
        self.assertEqual(ids.usage.prompt_tokens, 3)

    def test_completion_logprobs(self):
        r = self.client.completions.create(
            model=BASE, prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=2
        )
        (c,) = r.choices
        lp = c.logprobs
        n = r.usage.completion_tokens
        for field in (lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset):
            self.assertEqual(len(field), n)
        self.assertEqual(lp.text_offset[0], 0)
        for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            self.assertLessEqual(chosen, 0.0)
            # Keyed by token text: two ids with the same text make one entry.
            self.assertIn(len(top), (1, 2))
            # Greedy: the chosen token is the most likely one.
            self.assertIn(token, top)
            self.assertAlmostEqual(top[token], max(top.values()), places=5)
            self.assertAlmostEqual(top[token], chosen, places=5)
        self.assertTrue(all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:])), lp.text_offset)

    # -- adapters ---------------------------------------------------------------------------

    def test_an_adapter_is_served_by_name_and_version(self):
        base = self.client.chat.completions.create(**chat_body(max_tokens=12))
        answers = [
            self.client.chat.completions.create(**{**chat_body(max_tokens=12), "model": name})
            for name in [ADAPTER, f"{ADAPTER}@1", f"{ADAPTER}@latest"]
        ]
        for a in answers:
            self.assertEqual(a.model, ADAPTER, "answers name the adapter, not the selector")
            self.assertEqual(a.choices[0].message.content, answers[0].choices[0].message.content)
        self.assertNotEqual(
            answers[0].choices[0].message.content,
            base.choices[0].message.content,
            "the adapter changes the output",
        )
        streamed = list(
            self.client.chat.completions.create(**{**chat_body(max_tokens=12), "model": ADAPTER}, stream=True)
        )
        self.assertEqual({c.model for c in streamed}, {ADAPTER})
        self.assertEqual(
            "".join(c.choices[0].delta.content or "" for c in streamed), answers[0].choices[0].message.content
        )

    # -- request ids ------------------------------------------------------------------------

    def test_x_request_id(self):
        raw = self.client.chat.completions.with_raw_response.create(
            **chat_body(max_tokens=2), extra_headers={"X-Request-Id": "client-trace-42"}
        )
        self.assertEqual(raw.headers["x-request-id"], "client-trace-42", "the caller's id is echoed")
        self.assertEqual(raw.status_code, 200)
        completion = raw.parse()
        self.assertEqual(completion._request_id, "client-trace-42")
        self.assertEqual(completion.object, "chat.completion")
        # Without one the server makes one up; the client exposes it as `_request_id`.
        first = self.client.completions.create(model=BASE, prompt="hi", max_tokens=2)
        second = self.client.completions.create(model=BASE, prompt="hi", max_tokens=2)
        self.assertRegex(first._request_id, GENERATED_ID)
        self.assertNotEqual(first._request_id, second._request_id)
        # A client-wide default header, and on a stream.
        traced = self.other_client(default_headers={"X-Request-Id": "tenant-a:7"})
        with traced.chat.completions.with_streaming_response.create(**chat_body(max_tokens=2), stream=True) as s:
            self.assertEqual(s.headers["x-request-id"], "tenant-a:7")
            self.assertGreaterEqual(len(list(s.parse())), 1)
        # On an error as well.
        with self.assertRaises(openai.NotFoundError) as e:
            traced.models.retrieve("no-such-model")
        self.assertEqual(e.exception.request_id, "tenant-a:7")

    # -- what the server refuses ------------------------------------------------------------

    def test_tool_calls_parse_into_the_clients_own_types(self):
        # The model's chat template (e2e/openai-client.sh gives the tiny model a Hermes-format
        # one) shows the tools; `required` and a named function hold the answer to a grammar,
        # so even the random model's call parses into the pydantic model the tool came from.
        class Weather(pydantic.BaseModel):
            city: typing.Literal["Paris", "Oslo"]
            unit: typing.Literal["C", "F"]

        tool = openai.pydantic_function_tool(Weather, name="get_weather")
        body = chat_body("Weather in Oslo?", max_tokens=96)
        done = self.client.chat.completions.parse(**body, tools=[tool], tool_choice="required")
        choice = done.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertIsNone(choice.message.content)
        call = choice.message.tool_calls[0]
        self.assertEqual(call.type, "function")
        self.assertTrue(call.id.startswith("call_"), call.id)
        self.assertIsInstance(call.function.parsed_arguments, Weather)
        # A named function: its arguments, finished with `stop` as OpenAI does.
        named = {"type": "function", "function": {"name": "get_weather"}}
        done = self.client.chat.completions.parse(**body, tools=[tool], tool_choice=named)
        self.assertEqual(done.choices[0].finish_reason, "stop")
        self.assertIsInstance(done.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)
        # The call and its result go back in the conversation, as an agent loop sends them.
        messages = [
            {"role": "user", "content": "Weather in Oslo?"},
            done.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
            {"role": "tool", "tool_call_id": done.choices[0].message.tool_calls[0].id, "content": "-3"},
        ]
        for m in messages[1]["tool_calls"]:
            m["function"].pop("parsed_arguments", None)
        follow_up = self.client.chat.completions.create(model=BASE, messages=messages, max_tokens=2, tools=[tool])
        self.assertEqual(follow_up.object, "chat.completion")

    def test_streamed_tool_calls_accumulate_in_the_clients_stream_helper(self):
        # `auto` reads the calls the model writes; the random model would not write one, so a
        # guided regex (vLLM's extension) makes it write a Hermes call after some text.
        tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
        regex = r'Sure\.<tool_call>\{"name": "get_time", "arguments": \{\}\}</tool_call>'
        body = chat_body(max_tokens=64)
        with self.client.chat.completions.stream(**body, tools=tools, extra_body={"guided_regex": regex}) as stream:
            final = stream.get_final_completion()
        choice = final.choices[0]
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertEqual(choice.message.content, "Sure.")
        self.assertEqual([c.function.name for c in choice.message.tool_calls], ["get_time"])
        self.assertEqual(choice.message.tool_calls[0].function.arguments, "{}")
        # Unknown tool names and the legacy `functions` are refused, naming the field.
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(
                **chat_body(), tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}
            )
        self.assert_refused(e.exception, 400, "invalid_value", "tool_choice.function.name")
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(**chat_body(), functions=[{"name": "f"}])
        self.assert_refused(e.exception, 400, "unsupported_parameter", "functions")

    def test_json_output_follows_the_schema_the_client_derives_from_a_pydantic_model(self):
        # The client's own structured-output path: a pydantic model becomes a strict
        # json_schema response_format, and the answer is parsed back into the model. The
        # server decodes under that grammar, so even the tiny random model's answer parses.
        class Verdict(pydantic.BaseModel):
            answer: typing.Literal["yes", "no"]
            colour: typing.Literal["red", "green", "blue"]

        done = self.client.chat.completions.parse(**chat_body(max_tokens=64), response_format=Verdict)
        choice = done.choices[0]
        self.assertEqual(choice.finish_reason, "stop")
        self.assertIsInstance(choice.message.parsed, Verdict)
        self.assertIn(choice.message.parsed.answer, ("yes", "no"))
        # json_object: an object, as far as the answer goes.
        obj = self.client.chat.completions.create(**chat_body(max_tokens=32), response_format={"type": "json_object"})
        self.assertTrue(obj.choices[0].message.content.startswith("{"), obj.choices[0].message.content)
        # A schema that is not one is refused, naming the field.
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(**chat_body(), response_format=bad)
        self.assert_refused(e.exception, 400, "invalid_value", "response_format.json_schema.schema")
        ok = self.client.chat.completions.create(**chat_body(max_tokens=2), response_format={"type": "text"})
        self.assertEqual(ok.object, "chat.completion")

    def test_invalid_values_are_refused_naming_the_field(self):
        cases = [
            (dict(chat_body(), max_tokens=100_000), "context_length_exceeded", "max_tokens"),
            (dict(chat_body(), top_logprobs=2), "invalid_value", "top_logprobs"),
            (dict(chat_body(), temperature=3.0), "invalid_value", "temperature"),
            (dict(chat_body(), messages=[]), "empty_prompt", "messages"),
            (
                dict(chat_body(), messages=[{"role": "tool", "content": "x"}]),
                "invalid_value",
                "messages[0].tool_call_id",
            ),
            (dict(chat_body(), stop=["a", "b", "c", "d", "e"]), "invalid_value", "stop"),
            (dict(chat_body(), n=17), "invalid_value", "n"),
        ]
        for body, code, param in cases:
            with self.subTest(param=param):
                with self.assertRaises(openai.BadRequestError) as e:
                    self.client.chat.completions.create(**body)
                self.assert_refused(e.exception, 400, code, param)
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model=BASE, prompt="", max_tokens=2)
        self.assert_refused(e.exception, 400, "empty_prompt", "prompt")

    def test_an_oversized_body_gets_413_in_openai_error_shape(self):
        with self.assertRaises(openai.APIStatusError) as e:
            self.client.completions.create(model=BASE, prompt="x" * MAX_BODY_BYTES, max_tokens=2)
        err = e.exception
        self.assertEqual(err.status_code, 413, err.body)
        self.assertEqual(err.code, "request_too_large", err.body)
        self.assertEqual(err.type, "invalid_request_error", err.body)
        self.assertIn(str(MAX_BODY_BYTES), err.message)

    def test_a_wrong_api_key_is_an_authentication_error(self):
        for key in ["sk-wrong", API_KEY + "x"]:
            wrong = self.other_client(api_key=key)
            for call in [
                lambda: wrong.chat.completions.create(**chat_body(max_tokens=2)),
                lambda: wrong.completions.create(model=BASE, prompt="hi", max_tokens=2),
                lambda: wrong.models.list(),
            ]:
                with self.assertRaises(openai.AuthenticationError) as e:
                    call()
                err = e.exception
                self.assertEqual(err.status_code, 401, err.body)
                self.assertEqual(err.code, "invalid_api_key", err.body)
                self.assertEqual(err.type, "authentication_error", err.body)
                self.assertIsNone(err.param, err.body)
                self.assertNotIn(key, err.message, "the key presented is not echoed")

    def test_an_unknown_route_is_not_found(self):
        with self.assertRaises(openai.NotFoundError) as e:
            self.client.get("/no/such/route", cast_to=object)
        self.assertEqual(e.exception.code, "not_found")
        self.assertIn("/v1/no/such/route", e.exception.message)

    # -- concurrency ------------------------------------------------------------------------

    def test_concurrent_requests_through_the_async_client(self):
        async def run():
            options = {"base_url": BASE_URL, "api_key": API_KEY, "max_retries": 0, "timeout": 120}
            async with AsyncOpenAI(**options, _strict_response_validation=True) as c:
                prompts = [f"Question number {i}" for i in range(6)]
                whole = await asyncio.gather(
                    *[c.chat.completions.create(**chat_body(p, max_tokens=6)) for p in prompts]
                )

                async def streamed(p):
                    out = ""
                    async for chunk in await c.chat.completions.create(**chat_body(p, max_tokens=6), stream=True):
                        out += chunk.choices[0].delta.content or ""
                    return out

                texts = await asyncio.gather(*[streamed(p) for p in prompts])
                return whole, texts

        whole, texts = asyncio.run(run())
        self.assertEqual(len({r.id for r in whole}), 6)
        for r in whole:
            self.assert_usage(r.usage, 6)
        self.assertEqual(texts, [r.choices[0].message.content for r in whole], "batched streams match batched answers")


if __name__ == "__main__":
    unittest.main(verbosity=2)
