//! Chat templates: the Jinja `chat_template` of a model's tokenizer_config.json, or its
//! chat_template.jinja file.
//!
//! The server renders prompts and the trainer renders training conversations with this one
//! implementation, so an adapter sees at serving time exactly the text it was trained on.

use crate::error::{ModelError, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::Path;

mod tojson;

/// One turn of a conversation as templates see it (`message.role`, `message['content']`; in
/// tool use also `message.tool_calls`, and on a `tool` turn `message.tool_call_id` and
/// `message.name`). Fields a turn does not have are left undefined, as transformers leaves
/// them, since templates test them with `is defined`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's function calls.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A `tool` turn: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A `tool` turn: the function that answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            ..Self::default()
        }
    }

    /// The turn as the template sees it: a tool call's arguments parsed from their JSON text,
    /// keys in order, as vLLM passes them (templates write `arguments | tojson`).
    fn template_value(&self) -> Result<minijinja::Value> {
        let mut fields: Vec<(&str, minijinja::Value)> = vec![
            ("role", self.role.as_str().into()),
            ("content", self.content.as_str().into()),
        ];
        if !self.tool_calls.is_empty() {
            let calls = (self.tool_calls.iter())
                .map(ToolCall::template_value)
                .collect::<Result<Vec<_>>>()?;
            fields.push(("tool_calls", calls.into()));
        }
        if let Some(id) = &self.tool_call_id {
            fields.push(("tool_call_id", id.as_str().into()));
        }
        if let Some(name) = &self.name {
            fields.push(("name", name.as_str().into()));
        }
        Ok(fields.into_iter().collect())
    }
}

/// One function call in an assistant turn, as OpenAI's API writes it: `arguments` is JSON
/// text holding an object.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

impl ToolCall {
    fn template_value(&self) -> Result<minijinja::Value> {
        let arguments = parse_json(&self.arguments, "tool_calls[].function.arguments")?;
        let function: minijinja::Value = [("name", self.name.as_str().into()), ("arguments", arguments)]
            .into_iter()
            .collect();
        Ok([
            ("id", self.id.as_str().into()),
            ("type", "function".into()),
            ("function", function),
        ]
        .into_iter()
        .collect())
    }
}

/// What a template may be given beside the conversation.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatExtras<'a> {
    /// The functions the model may call: JSON text of OpenAI's `tools` list, given to the
    /// template as `tools` (keys in the client's order). None gives `tools = none`, as
    /// transformers does.
    pub tools_json: Option<&'a str>,
    /// More template variables (vLLM's `chat_template_kwargs`, such as `enable_thinking`):
    /// JSON text of an object.
    pub kwargs_json: Option<&'a str>,
}

/// JSON text as a template value, object keys in order.
fn parse_json(text: &str, what: &str) -> Result<minijinja::Value> {
    serde_json::from_str(text).map_err(|e| ModelError::ChatRender(format!("{what} is not JSON: {e}")))
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
}

/// Also the file name in minijinja's errors: "(in chat_template:3)" is line 3 of the template.
const NAME: &str = "chat_template";

impl ChatTemplate {
    /// The template of a parsed tokenizer_config.json, or None when it has none. `path` is the
    /// file's path, for errors.
    pub fn from_tokenizer_config(config: &Value, path: &Path) -> Result<Option<Self>> {
        let Some(source) = template_source(config, path)? else {
            return Ok(None);
        };
        Self::compile_with_tokens(source, config, path).map(Some)
    }

    /// The template of a model directory: `chat_template.jinja` beside tokenizer_config.json
    /// when there is one (newer transformers save it there, and it wins over the field, as in
    /// transformers), else the config's `chat_template`. `config_path` is the parsed
    /// tokenizer_config.json's path.
    pub fn for_model(config: &Value, config_path: &Path) -> Result<Option<Self>> {
        let file = config_path.with_file_name("chat_template.jinja");
        if !file.exists() {
            return Self::from_tokenizer_config(config, config_path);
        }
        let source = std::fs::read_to_string(&file).map_err(ModelError::io(&file))?;
        Self::compile_with_tokens(&source, config, &file).map(Some)
    }

    /// Compiles `source` with the config's BOS and EOS texts; errors name `path`, the file the
    /// source came from.
    fn compile_with_tokens(source: &str, config: &Value, path: &Path) -> Result<Self> {
        let bos = special_token_text(config, "bos_token").unwrap_or_default();
        let eos = special_token_text(config, "eos_token").unwrap_or_default();
        Self::compile(source, bos, eos).map_err(|e| ModelError::ChatTemplate {
            path: path.into(),
            reason: e.to_string(),
        })
    }

    /// Compiles `source`; a syntax error names the template line.
    pub fn compile(source: &str, bos_token: &str, eos_token: &str) -> std::result::Result<Self, minijinja::Error> {
        let mut env = minijinja::Environment::new();
        // As transformers' apply_chat_template renders them: a block tag's own line break and
        // indentation are not output, which multi-line templates are written for.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        // HF templates call Python string methods (`.strip()`, `.startswith()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_global("bos_token", bos_token.to_string());
        env.add_global("eos_token", eos_token.to_string());
        // HF templates reject conversations they cannot express with raise_exception("...").
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
            },
        );
        // Python's json.dumps, as transformers defines the filter (see tojson.rs).
        env.add_filter("tojson", tojson::filter);
        // Templates that date their system prompt (Llama 3.1's "Today Date").
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_string())?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    /// The conversation as text. `add_generation_prompt` appends what opens the assistant's
    /// next turn (a prompt for generation); without it the text ends after the last message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, ChatExtras::default())
    }

    /// [`render`](Self::render) with tools and extra variables.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extras: ChatExtras,
    ) -> Result<String> {
        let render_error = |e: minijinja::Error| ModelError::ChatRender(e.to_string());
        let template = self.env.get_template(NAME).map_err(render_error)?;
        let messages = (messages.iter())
            .map(ChatMessage::template_value)
            .collect::<Result<Vec<_>>>()?;
        let tools = match extras.tools_json {
            Some(text) => parse_json(text, "tools")?,
            None => minijinja::Value::from(()),
        };
        let kwargs = match extras.kwargs_json {
            Some(text) => parse_json(text, "chat_template_kwargs")?,
            None => minijinja::Value::from_iter(std::iter::empty::<(String, minijinja::Value)>()),
        };
        if kwargs.kind() != minijinja::value::ValueKind::Map {
            return Err(ModelError::ChatRender("chat_template_kwargs must be an object".into()));
        }
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                tools => tools,
                ..kwargs
            })
            .map_err(render_error)
    }

    /// Whether the template reads `tools`: one that does not would drop them from the prompt,
    /// and the model would call functions it was never shown.
    pub fn uses_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template's text, from which a server reads the tool-call format it teaches.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// Python's `datetime.now().strftime(format)`; a format chrono cannot write is an error, not a
/// panic.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("strftime_now: `{format}` is not a date format"),
        )
    })?;
    Ok(out)
}

/// `chat_template` is a string, or a list of `{name, template}` in which "default" is the one.
/// Anything else is an error rather than ignored: falling back to another format would train
/// or prompt the model with text it does not expect.
fn template_source<'a>(config: &'a Value, path: &Path) -> Result<Option<&'a str>> {
    let bad = |reason: &str| ModelError::InvalidConfig {
        path: path.into(),
        field: NAME.into(),
        reason: reason.into(),
    };
    match config.get(NAME) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(Some)
            .ok_or_else(|| bad("a list of named templates without one named `default` (with a string `template`)")),
        Some(_) => Err(bad("expected a string or a list of {name, template}")),
    }
}

/// A special token's text: tokenizer_config.json writes it as a string or as an AddedToken
/// object with `content`.
pub fn special_token_text<'a>(config: &'a Value, field: &str) -> Option<&'a str> {
    match config.get(field)? {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A ChatML-style template, as Qwen2 and many others ship it.
    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                          {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn chatml() -> ChatTemplate {
        let config = json!({"chat_template": CHATML, "eos_token": "<|im_end|>"});
        ChatTemplate::from_tokenizer_config(&config, Path::new("m/tokenizer_config.json"))
            .expect("compiles")
            .expect("has one")
    }

    #[test]
    fn renders_a_prompt_with_and_without_the_generation_prompt() {
        let t = chatml();
        let msgs = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
        let prompt = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n";
        assert_eq!(t.render(&msgs, false).expect("render"), prompt);
        assert_eq!(
            t.render(&msgs, true).expect("render"),
            format!("{prompt}<|im_start|>assistant\n")
        );
    }

    #[test]
    fn special_tokens_and_python_string_methods_are_available() {
        let config = json!({
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{{ eos_token }}{% endfor %}",
            "bos_token": {"content": "<s>", "special": true},
            "eos_token": "</s>",
        });
        let t = ChatTemplate::from_tokenizer_config(&config, Path::new("x"))
            .expect("ok")
            .expect("some");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi  ")], false).expect("render"),
            "<s>hi</s>"
        );
    }

    #[test]
    fn the_default_of_a_list_of_templates_is_used_and_a_list_without_one_is_an_error() {
        let path = Path::new("m/tokenizer_config.json");
        let listed =
            json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        let t = ChatTemplate::from_tokenizer_config(&listed, path)
            .expect("ok")
            .expect("some");
        assert_eq!(t.render(&[], false).expect("render"), "D");
        assert!(ChatTemplate::from_tokenizer_config(&json!({}), path)
            .expect("ok")
            .is_none());
        let no_default = json!({"chat_template": [{"name": "tool_use", "template": "T"}]});
        let err = ChatTemplate::from_tokenizer_config(&no_default, path)
            .err()
            .expect("error")
            .to_string();
        assert!(
            err.contains("m/tokenizer_config.json") && err.contains("chat_template") && err.contains("default"),
            "{err}"
        );
    }

    #[test]
    fn block_tags_leave_no_line_breaks_or_indentation_as_in_transformers() {
        let source = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[U] {{ m.content }}\n    {% else %}\n\
                      [A] {{ m.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::compile(source, "", "").expect("compiles");
        let msgs = [ChatMessage::new("user", "hi"), ChatMessage::new("assistant", "yo")];
        assert_eq!(t.render(&msgs, false).expect("render"), "[U] hi\n[A] yo\n");
    }

    #[test]
    fn a_syntax_error_names_the_file_and_the_template_line() {
        let config = json!({"chat_template": "{% for m in messages %}\n{{ m.content }\n{% endfor %}"});
        let err = ChatTemplate::from_tokenizer_config(&config, Path::new("m/tokenizer_config.json"))
            .err()
            .expect("error");
        let err = err.to_string();
        assert!(
            err.starts_with("m/tokenizer_config.json: chat_template: syntax error"),
            "{err}"
        );
        assert!(err.contains("chat_template:2"), "{err}");
    }

    #[test]
    fn a_chat_template_jinja_file_wins_over_the_config_field() {
        let dir = tempfile::tempdir().expect("dir");
        let config_path = dir.path().join("tokenizer_config.json");
        let config = json!({"chat_template": "from the field", "eos_token": "</s>"});
        let field = ChatTemplate::for_model(&config, &config_path)
            .expect("ok")
            .expect("some");
        assert_eq!(field.render(&[], false).expect("render"), "from the field");
        std::fs::write(dir.path().join("chat_template.jinja"), "from the file {{ eos_token }}").expect("write");
        let file = ChatTemplate::for_model(&config, &config_path)
            .expect("ok")
            .expect("some");
        assert_eq!(file.render(&[], false).expect("render"), "from the file </s>");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").expect("write");
        let err = ChatTemplate::for_model(&config, &config_path)
            .err()
            .expect("syntax error")
            .to_string();
        assert!(
            err.contains("chat_template.jinja: chat_template: syntax error"),
            "{err}"
        );
    }

    #[test]
    fn raise_exception_is_a_render_error_with_the_templates_message() {
        let config = json!({"chat_template": "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"});
        let t = ChatTemplate::from_tokenizer_config(&config, Path::new("x"))
            .expect("ok")
            .expect("some");
        let err = t
            .render(&[ChatMessage::new("system", "s")], true)
            .expect_err("raises")
            .to_string();
        assert!(err.contains("System role not supported"), "{err}");
        assert!(t.render(&[ChatMessage::new("user", "u")], true).is_ok());
    }

    /// A Hermes-style tool template (Qwen2.5's shape): tools as JSON lines in the system turn,
    /// calls as `<tool_call>` blocks, results as `tool` turns.
    const TOOLS: &str = "{% if tools %}<tools>{% for t in tools %}{{ '\\n' }}{{ t | tojson }}{% endfor %}{{ '\\n' }}</tools>{{ '\\n' }}{% endif %}\
        {% for m in messages %}[{{ m.role }}]{% if m.tool_calls is defined %}{% for c in m.tool_calls %}\
        <tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>\
        {% endfor %}{% elif m.tool_call_id is defined %}({{ m.tool_call_id }} {{ m.name }}) {{ m.content }}\
        {% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}{% if enable_thinking is defined %}think={{ enable_thinking }}{% endif %}";

    #[test]
    fn tools_tool_calls_and_tool_turns_render_with_their_keys_in_the_clients_order() {
        let t = ChatTemplate::compile(TOOLS, "", "").expect("compiles");
        assert!(t.uses_tools());
        let tools = r#"[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]"#;
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris","unit":"C"}"#.into(),
        };
        let msgs = [
            ChatMessage::new("user", "Weather in Paris?"),
            ChatMessage {
                role: "assistant".into(),
                tool_calls: vec![call],
                ..ChatMessage::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "18".into(),
                tool_call_id: Some("call_1".into()),
                name: Some("get_weather".into()),
                ..ChatMessage::default()
            },
        ];
        let extras = ChatExtras {
            tools_json: Some(tools),
            kwargs_json: Some(r#"{"enable_thinking": false}"#),
        };
        let text = t.render_with(&msgs, false, extras).expect("render");
        assert_eq!(
            text,
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}}}}\n</tools>\n\
             [user]Weather in Paris?\n\
             [assistant]<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"C\"}}</tool_call>\n\
             [tool](call_1 get_weather) 18\n\
             think=False"
        );
        // Without tools the template sees `tools = none`, and plain turns have no tool fields.
        let plain = t.render(&msgs[..1], false).expect("render");
        assert_eq!(plain, "[user]Weather in Paris?\n");
        // Booleans print as Python prints them, as in transformers' Jinja.
        assert!(!ChatTemplate::compile(CHATML, "", "").expect("compiles").uses_tools());
    }

    #[test]
    fn bad_arguments_json_and_bad_date_formats_are_errors_not_panics() {
        let t = ChatTemplate::compile(TOOLS, "", "").expect("compiles");
        let msgs = [ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments: "{not json".into(),
            }],
            ..ChatMessage::default()
        }];
        let err = t.render(&msgs, false).expect_err("bad JSON").to_string();
        assert!(err.contains("arguments is not JSON"), "{err}");
        let dated =
            ChatTemplate::compile("{{ strftime_now('%Y') }}|{{ strftime_now('%Q') }}", "", "").expect("compiles");
        let err = dated.render(&[], false).expect_err("%Q is no format").to_string();
        assert!(err.contains("strftime_now"), "{err}");
        let year = ChatTemplate::compile("{{ strftime_now('%Y') }}", "", "").expect("compiles");
        let y: i32 = year.render(&[], false).expect("render").parse().expect("a year");
        assert!(y >= 2024, "{y}");
    }
}
