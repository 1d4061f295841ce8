//! Tool calling: OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`.
//!
//! The chat template shows the tools to the model (`tools` in its context). What comes back
//! depends on `tool_choice`, as in vLLM:
//! - `auto`: the model answers freely, and calls are read out of its text in the format its
//!   template taught it ([`ToolFormat`]). Text that does not parse as calls stays content:
//!   nothing the model wrote is lost.
//! - `required`, or one named function: the output is held to a grammar (a JSON list of
//!   `{name, parameters}`, or the named function's arguments), so every answer is a valid call
//!   whatever the model learned.
//! - `none`: the tools are shown and nothing is read as a call.
//!
//! Streaming and whole responses both read the text through one [`ToolCallReader`].

use crate::error::ApiError;
use crate::grammar::GrammarSpec;
use serde_json::{json, Value};

/// How a model writes a call when it chooses to (`tool_choice: auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolFormat {
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>` blocks (Hermes, Qwen2.5, Qwen3).
    Hermes,
    /// A JSON object `{"name": …, "parameters": {…}}`, several separated by `;` (Llama 3.1+).
    #[value(name = "llama3_json")]
    Llama3Json,
}

/// `--tool-call-parser`: a format, `auto` to read it off the chat template, or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ToolParserFlag {
    Auto,
    None,
    Hermes,
    #[value(name = "llama3_json")]
    Llama3Json,
}

impl ToolParserFlag {
    /// The format to read calls in, given the chat template's source (None: no template).
    pub fn resolve(self, template: Option<&str>) -> Option<ToolFormat> {
        match self {
            Self::None => None,
            Self::Hermes => Some(ToolFormat::Hermes),
            Self::Llama3Json => Some(ToolFormat::Llama3Json),
            Self::Auto => detect(template?),
        }
    }
}

/// The call format a template teaches: what it writes for an assistant's `tool_calls`.
fn detect(template: &str) -> Option<ToolFormat> {
    if template.contains("<tool_call>") {
        Some(ToolFormat::Hermes)
    } else if template.contains("<|python_tag|>") || template.contains("\"parameters\": dictionary of argument name") {
        Some(ToolFormat::Llama3Json)
    } else {
        None
    }
}

/// What a request's `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolChoice {
    Auto(ToolFormat),
    Required,
    Named(String),
}

/// A request's tools, checked: what the template gets and how the answer is read.
#[derive(Debug, Clone)]
pub struct ValidTools {
    /// The `tools` list as JSON text, for the template (keys in the client's order).
    pub json: String,
    /// None for `tool_choice: none`: the tools are shown, nothing is read as a call.
    pub choice: Option<ToolChoice>,
    /// Output grammar for `required` and a named function.
    pub grammar: Option<GrammarSpec>,
    pub parallel: bool,
}

/// What validation knows about the model's tool support.
pub struct ToolSupport {
    /// The chat template renders `tools`.
    pub template_renders_tools: bool,
    pub format: Option<ToolFormat>,
}

/// Checks `tools`, `tool_choice` and `parallel_tool_calls`; `tools_text` is the `tools` field's
/// own JSON text. None when the request has no tools.
pub fn validate(
    tools: Option<&Value>,
    tools_text: Option<&str>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
    support: &ToolSupport,
) -> Result<Option<ValidTools>, ApiError> {
    let functions = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list.iter().enumerate().map(function).collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid(
                "tools",
                "must be a list of {type: function, function: {...}}",
            ))
        }
    };
    if let Some((i, name)) = duplicate(&functions) {
        return Err(ApiError::invalid(
            format!("tools[{i}].function.name"),
            format!("function `{name}` is listed twice"),
        ));
    }
    let choice = parse_choice(tool_choice, &functions)?;
    if functions.is_empty() {
        return match choice {
            Choice::None | Choice::Auto => Ok(None),
            _ => Err(ApiError::invalid(
                "tool_choice",
                "names a tool call, but `tools` is empty",
            )),
        };
    }
    if !support.template_renders_tools {
        return Err(ApiError::invalid_code(
            "tools",
            "unsupported_parameter",
            "this model's chat template does not show `tools` to the model, so it could not know them",
        ));
    }
    let parallel = parallel.unwrap_or(true);
    let (choice, grammar) = match choice {
        Choice::None => (None, None),
        Choice::Auto => {
            let format = support.format.ok_or_else(|| {
                ApiError::invalid_code(
                    "tool_choice",
                    "unsupported_parameter",
                    "`auto` needs the model's call format, which its chat template does not show; start the server with --tool-call-parser, or send `required` or a named function",
                )
            })?;
            (Some(ToolChoice::Auto(format)), None)
        }
        Choice::Required => (Some(ToolChoice::Required), Some(required_grammar(&functions, parallel))),
        Choice::Named(i) => {
            let f = &functions[i];
            let spec = GrammarSpec::JsonSchema(f.parameters.clone());
            (Some(ToolChoice::Named(f.name.clone())), Some(spec))
        }
    };
    Ok(Some(ValidTools {
        json: tools_text.unwrap_or("[]").to_string(),
        choice,
        grammar,
        parallel,
    }))
}

struct Function {
    name: String,
    parameters: Value,
}

fn function((i, tool): (usize, &Value)) -> Result<Function, ApiError> {
    let at = |field: &str| format!("tools[{i}].{field}");
    if tool.get("type").and_then(Value::as_str) != Some("function") {
        return Err(ApiError::invalid(at("type"), "must be `function`"));
    }
    let f = tool
        .get("function")
        .filter(|f| f.is_object())
        .ok_or_else(|| ApiError::invalid(at("function"), "must be an object with a `name`"))?;
    let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
    let valid_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid_char) {
        return Err(ApiError::invalid(
            at("function.name"),
            "must be 1 to 64 letters, digits, `_` or `-`",
        ));
    }
    if let Some(d) = f.get("description").filter(|d| !d.is_string() && !d.is_null()) {
        return Err(ApiError::invalid(
            at("function.description"),
            format!("must be a string, got {d}"),
        ));
    }
    // OpenAI: a function without `parameters` takes none.
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}, "additionalProperties": false}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(ApiError::invalid(
                at("function.parameters"),
                "must be a JSON schema object",
            ))
        }
    };
    Ok(Function {
        name: name.to_string(),
        parameters,
    })
}

fn duplicate(functions: &[Function]) -> Option<(usize, &str)> {
    (functions.iter().enumerate())
        .find(|(i, f)| functions[..*i].iter().any(|g| g.name == f.name))
        .map(|(i, f)| (i, f.name.as_str()))
}

enum Choice {
    None,
    Auto,
    Required,
    /// Index into the functions.
    Named(usize),
}

fn parse_choice(v: Option<&Value>, functions: &[Function]) -> Result<Choice, ApiError> {
    let named = |v: &Value| {
        let name = v.get("function").and_then(|f| f.get("name")).and_then(Value::as_str);
        let Some(name) = name.filter(|_| v.get("type").and_then(Value::as_str) == Some("function")) else {
            return Err(ApiError::invalid(
                "tool_choice",
                "must be `none`, `auto`, `required` or {type: function, function: {name}}",
            ));
        };
        (functions.iter().position(|f| f.name == name))
            .map(Choice::Named)
            .ok_or_else(|| ApiError::invalid("tool_choice.function.name", format!("`{name}` is not in `tools`")))
    };
    match v {
        None | Some(Value::Null) => Ok(Choice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(Choice::None),
            "auto" => Ok(Choice::Auto),
            "required" => Ok(Choice::Required),
            other => Err(ApiError::invalid(
                "tool_choice",
                format!("`{other}` is not `none`, `auto` or `required`"),
            )),
        },
        Some(v) => named(v),
    }
}

/// `required`: a JSON list of at least one call (at most one without parallel calls), each
/// `{"name": <a listed function>, "parameters": <its arguments>}`.
fn required_grammar(functions: &[Function], parallel: bool) -> GrammarSpec {
    let calls: Vec<Value> = functions
        .iter()
        .map(|f| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "parameters": f.parameters},
                "required": ["name", "parameters"],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = json!({"type": "array", "minItems": 1, "items": {"anyOf": calls}});
    if !parallel {
        schema["maxItems"] = json!(1);
    }
    GrammarSpec::JsonSchema(schema)
}

/// One call read from the model's output.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    pub name: String,
    /// JSON text of an object, as OpenAI sends it.
    pub arguments: String,
}

/// A choice's text split into content and calls, as it arrives.
pub struct ToolCallReader {
    choice: ToolChoice,
    parallel: bool,
    /// Text kept back: it may be (the start of) calls.
    held: String,
    /// The calls have begun: everything from here on is held until the end.
    in_calls: bool,
    /// Any text at all has arrived (Llama 3's JSON calls start the answer).
    started: bool,
}

/// Where Hermes calls start.
const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";

impl ToolCallReader {
    pub fn new(choice: ToolChoice, parallel: bool) -> Self {
        // The grammar-held choices are calls from the first token.
        let in_calls = !matches!(choice, ToolChoice::Auto(_));
        Self {
            choice,
            parallel,
            held: String::new(),
            in_calls,
            started: false,
        }
    }

    /// Takes the next text of the choice; returns what can be sent as content now.
    pub fn push(&mut self, text: &str) -> String {
        self.held.push_str(text);
        if self.in_calls {
            return String::new();
        }
        match self.choice {
            ToolChoice::Auto(ToolFormat::Hermes) => {
                if let Some(at) = self.held.find(HERMES_OPEN) {
                    self.in_calls = true;
                    return self.held.drain(..at).collect();
                }
                // A suffix that may be the start of `<tool_call>` waits for the next text.
                let keep = (1..HERMES_OPEN.len())
                    .rev()
                    .find(|&n| self.held.ends_with(&HERMES_OPEN[..n]))
                    .unwrap_or(0);
                self.held.drain(..self.held.len() - keep).collect()
            }
            ToolChoice::Auto(ToolFormat::Llama3Json) => {
                let trimmed = self.held.trim_start();
                if !self.started && trimmed.is_empty() {
                    return String::new();
                }
                self.started = true;
                if trimmed.starts_with('{') {
                    self.in_calls = true;
                    return String::new();
                }
                std::mem::take(&mut self.held)
            }
            ToolChoice::Required | ToolChoice::Named(_) => String::new(),
        }
    }

    /// At the end of the choice: the content not yet returned, and the calls. Held text that
    /// does not parse as calls is returned as content.
    pub fn finish(self) -> (String, Vec<ParsedCall>) {
        if !self.in_calls {
            return (self.held, Vec::new());
        }
        let calls = match &self.choice {
            ToolChoice::Auto(ToolFormat::Hermes) => hermes_calls(&self.held),
            ToolChoice::Auto(ToolFormat::Llama3Json) => llama3_calls(&self.held),
            ToolChoice::Required => required_calls(&self.held),
            ToolChoice::Named(name) => named_call(name, &self.held),
        };
        match calls {
            Some(mut calls) if !calls.is_empty() => {
                if !self.parallel {
                    // The client asked for one call; a model that wrote more did so unasked.
                    calls.truncate(1);
                }
                (String::new(), calls)
            }
            _ => (self.held, Vec::new()),
        }
    }

    /// Whether the answer's calls make its finish reason `tool_calls` (OpenAI keeps `stop`
    /// for a function the client named).
    pub fn reports_tool_calls(&self) -> bool {
        !matches!(self.choice, ToolChoice::Named(_))
    }
}

/// A call written as `{"name": …, "<arguments_key>": {…}}`.
fn call_from_object(v: &Value, arguments_keys: &[&str]) -> Option<ParsedCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let arguments = arguments_keys.iter().find_map(|k| v.get(*k))?;
    let arguments = match arguments {
        Value::Object(_) => arguments.to_string(),
        // Some models write the arguments as a JSON string, as the API carries them.
        Value::String(s) if serde_json::from_str::<Value>(s).is_ok_and(|a| a.is_object()) => s.clone(),
        _ => return None,
    };
    Some(ParsedCall { name, arguments })
}

fn hermes_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let mut calls = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        let body = rest.strip_prefix(HERMES_OPEN)?;
        // The last block may lack its close when generation stopped at EOS right after it.
        let (inside, after) = body.split_once(HERMES_CLOSE).unwrap_or((body, ""));
        let v: Value = serde_json::from_str(inside.trim()).ok()?;
        calls.push(call_from_object(&v, &["arguments", "parameters"])?);
        rest = after.trim_start();
    }
    Some(calls)
}

fn llama3_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let mut calls = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
        if rest.is_empty() {
            return Some(calls);
        }
        let mut values = serde_json::Deserializer::from_str(rest).into_iter::<Value>();
        let v = values.next()?.ok()?;
        calls.push(call_from_object(&v, &["parameters", "arguments"])?);
        rest = &rest[values.byte_offset()..];
    }
}

fn required_calls(text: &str) -> Option<Vec<ParsedCall>> {
    let v: Value = serde_json::from_str(text).ok()?;
    v.as_array()?
        .iter()
        .map(|c| call_from_object(c, &["parameters"]))
        .collect()
}

fn named_call(name: &str, text: &str) -> Option<Vec<ParsedCall>> {
    let v: Value = serde_json::from_str(text).ok()?;
    v.is_object().then(|| {
        vec![ParsedCall {
            name: name.to_string(),
            arguments: text.to_string(),
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(choice: ToolChoice, pieces: &[&str]) -> (String, String, Vec<ParsedCall>) {
        let mut reader = ToolCallReader::new(choice, true);
        let streamed: String = pieces.iter().map(|p| reader.push(p)).collect();
        let (rest, calls) = reader.finish();
        (streamed, rest, calls)
    }

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_calls_are_read_out_of_the_text_and_the_text_before_them_streams_as_content() {
        let pieces = [
            "Let me check.\n<tool",
            "_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n",
            "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
        ];
        let (streamed, rest, calls) = read(ToolChoice::Auto(ToolFormat::Hermes), &pieces);
        assert_eq!(streamed, "Let me check.\n", "`<tool` was held until it proved a call");
        assert_eq!(rest, "");
        assert_eq!(
            calls,
            [call("get_weather", r#"{"city":"Paris"}"#), call("get_time", "{}")]
        );
    }

    #[test]
    fn text_that_only_looks_like_a_call_is_kept_as_content() {
        let (streamed, rest, calls) = read(ToolChoice::Auto(ToolFormat::Hermes), &["a <tool", "box> b"]);
        assert_eq!((streamed + &rest, calls.len()), ("a <toolbox> b".to_string(), 0));
        let broken = ["<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1"];
        let (streamed, rest, calls) = read(ToolChoice::Auto(ToolFormat::Hermes), &broken);
        assert!(calls.is_empty());
        assert_eq!(
            streamed + &rest,
            broken[0],
            "a call cut off by max_tokens is returned as text"
        );
    }

    #[test]
    fn llama3_json_calls_are_read_and_plain_answers_stream() {
        let text = r#" {"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}"#;
        let (streamed, rest, calls) = read(ToolChoice::Auto(ToolFormat::Llama3Json), &[text]);
        assert_eq!((streamed.as_str(), rest.as_str()), ("", ""));
        assert_eq!(calls, [call("f", r#"{"a":1}"#), call("g", "{}")]);
        let (streamed, rest, calls) = read(ToolChoice::Auto(ToolFormat::Llama3Json), &["It is ", "sunny."]);
        assert_eq!((streamed + &rest, calls.len()), ("It is sunny.".to_string(), 0));
    }

    #[test]
    fn required_and_named_answers_are_read_as_calls_and_only_one_is_kept_without_parallel_calls() {
        let list = r#"[{"name": "f", "parameters": {"a": 1}}, {"name": "g", "parameters": {}}]"#;
        let (_, _, calls) = read(ToolChoice::Required, &[list]);
        assert_eq!(calls.len(), 2);
        let mut single = ToolCallReader::new(ToolChoice::Required, false);
        assert_eq!(single.push(list), "");
        assert_eq!(single.finish().1, [call("f", r#"{"a":1}"#)]);
        let named = ToolCallReader::new(ToolChoice::Named("f".into()), true);
        assert!(!named.reports_tool_calls(), "OpenAI finishes a named call with `stop`");
        let (_, _, calls) = read(ToolChoice::Named("f".into()), &[r#"{"a": 1}"#]);
        assert_eq!(calls, [call("f", r#"{"a": 1}"#)]);
    }

    fn support() -> ToolSupport {
        ToolSupport {
            template_renders_tools: true,
            format: Some(ToolFormat::Hermes),
        }
    }

    fn check(tools: Value, choice: Option<Value>) -> Result<Option<ValidTools>, ApiError> {
        validate(
            Some(&tools),
            Some(&tools.to_string()),
            choice.as_ref(),
            None,
            &support(),
        )
    }

    fn param_of(e: ApiError) -> String {
        e.body()["error"]["param"].as_str().unwrap_or_default().to_string()
    }

    #[test]
    fn bad_tools_and_tool_choices_are_refused_naming_the_field() {
        let f = |name: &str| json!({"type": "function", "function": {"name": name}});
        let cases = [
            (json!([{"type": "retrieval"}]), None, "tools[0].type"),
            (json!([f("ok"), f("bad name")]), None, "tools[1].function.name"),
            (json!([f("a"), f("a")]), None, "tools[1].function.name"),
            (
                json!([{"type": "function", "function": {"name": "a", "parameters": []}}]),
                None,
                "tools[0].function.parameters",
            ),
            (json!([f("a")]), Some(json!("sometimes")), "tool_choice"),
            (
                json!([f("a")]),
                Some(json!({"type": "function", "function": {"name": "b"}})),
                "tool_choice.function.name",
            ),
            (json!([]), Some(json!("required")), "tool_choice"),
        ];
        for (tools, choice, param) in cases {
            let err = check(tools.clone(), choice).expect_err(&tools.to_string());
            assert_eq!(param_of(err), param, "{tools}");
        }
    }

    #[test]
    fn auto_needs_a_call_format_and_tools_need_a_template_that_shows_them() {
        let tools = json!([{"type": "function", "function": {"name": "a"}}]);
        let no_format = ToolSupport {
            template_renders_tools: true,
            format: None,
        };
        let err = validate(Some(&tools), None, None, None, &no_format).expect_err("auto");
        assert_eq!(param_of(err), "tool_choice");
        let required = json!("required");
        let held = validate(Some(&tools), None, Some(&required), None, &no_format).expect("a grammar holds it");
        assert!(held.expect("tools").grammar.is_some());
        let hidden = ToolSupport {
            template_renders_tools: false,
            format: Some(ToolFormat::Hermes),
        };
        let err = validate(Some(&tools), None, None, None, &hidden).expect_err("not shown");
        assert_eq!(param_of(err), "tools");
    }

    #[test]
    fn the_format_is_read_off_the_template() {
        assert_eq!(
            ToolParserFlag::Auto.resolve(Some("{{ '<tool_call>' }}")),
            Some(ToolFormat::Hermes)
        );
        assert_eq!(
            ToolParserFlag::Auto.resolve(Some("{{- '<|python_tag|>' }}")),
            Some(ToolFormat::Llama3Json)
        );
        assert_eq!(ToolParserFlag::Auto.resolve(Some("{{ m.content }}")), None);
        assert_eq!(ToolParserFlag::None.resolve(Some("<tool_call>")), None);
        assert_eq!(ToolParserFlag::Hermes.resolve(None), Some(ToolFormat::Hermes));
    }
}
