//! Chat records rendered with the model's own chat template (tokenizer_config.json), split into
//! segments so that only the assistant turns are trained on.
//!
//! A template renders a whole conversation at once and marks no turns, so each assistant turn
//! is located by rendering prefixes of the conversation with the same template:
//! - the messages before assistant message `i`, with the generation prompt, are exactly the
//!   prompt the server sends when the model is to write that turn: its end is where the turn
//!   starts;
//! - the messages up to and including `i`, without it, end where the turn ends, including what
//!   the template closes a turn with (`<|im_end|>\n`, ` </s>`).
//!
//! The text between the two is trained on, the rest is not. Both renderings must be prefixes of
//! the whole conversation's; a template that renders a turn differently once more messages
//! follow (one that drops past reasoning, say) cannot be masked this way, and is an error that
//! names the message.

use super::records::{Message, Role};
use super::render::Segment;
use super::tokenize::Framing;
use kubetune_model::chat::{ChatMessage, ChatTemplate};
use kubetune_model::ModelError;

/// A conversation as segments, and how the tokenizer step frames them.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub segments: Vec<Segment>,
    pub framing: Framing,
}

/// Renders `messages` with `template`. `eos` is EOS as text: appended after the last message
/// (trained on when that message is the assistant's, as in the default format) unless the
/// template already ends the conversation with it. The error is a message without file and line.
pub fn render_with_template(
    messages: &[Message],
    template: &ChatTemplate,
    eos: Option<&str>,
) -> Result<Rendered, String> {
    render_answers_with_template(messages, template, eos, 0)
}

/// As [`render_with_template`], trained only on assistant messages from index `first_trained`
/// on (a preference pair's answer after its prompt); EOS is trained on when the last message is
/// one of those.
pub fn render_answers_with_template(
    messages: &[Message],
    template: &ChatTemplate,
    eos: Option<&str>,
    first_trained: usize,
) -> Result<Rendered, String> {
    let chat: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage::new(m.role.as_str(), m.content.as_str()))
        .collect();
    let full = template
        .render(&chat, false)
        .map_err(|e| template_error(e, "this conversation"))?;
    let mut segments = Vec::new();
    // Bytes of `full` already in segments.
    let mut done = 0;
    let trained_turns = messages.iter().enumerate().skip(first_trained);
    for (i, _) in trained_turns.filter(|(_, m)| m.role == Role::Assistant) {
        let (start, end) = assistant_turn(&full, &chat, template, i)?;
        if start < done {
            return Err(unmaskable(
                i,
                "the prompt for it ends before the previous assistant message does",
            ));
        }
        push(&mut segments, &full[done..start], false);
        push(&mut segments, &full[start..end], true);
        done = end;
    }
    push(&mut segments, &full[done..], false);
    let ends_with_eos = eos.is_some_and(|e| !e.is_empty() && full.trim_end().ends_with(e));
    let last_is_assistant = messages.last().is_some_and(|m| m.role == Role::Assistant);
    let framing = Framing {
        special_tokens: false,
        eos: (!ends_with_eos).then_some(last_is_assistant),
    };
    Ok(Rendered { segments, framing })
}

/// Byte range of assistant message `i`'s turn in `full`, the rendering of all of `chat`.
fn assistant_turn(
    full: &str,
    chat: &[ChatMessage],
    template: &ChatTemplate,
    i: usize,
) -> Result<(usize, usize), String> {
    let prompt = template
        .render(&chat[..i], true)
        .map_err(|e| template_error(e, &format!("messages[..{i}] with add_generation_prompt")))?;
    if !full.starts_with(&prompt) {
        let what = format!("messages[..{i}] with add_generation_prompt (the prompt for this turn)");
        return Err(unmaskable(i, &not_a_prefix(&what, &prompt, full)));
    }
    let turn = template
        .render(&chat[..=i], false)
        .map_err(|e| template_error(e, &format!("messages[..={i}]")))?;
    if !full.starts_with(&turn) {
        return Err(unmaskable(i, &not_a_prefix(&format!("messages[..={i}]"), &turn, full)));
    }
    if turn.len() < prompt.len() {
        return Err(unmaskable(
            i,
            "the template renders the turn shorter than the generation prompt that opens it",
        ));
    }
    Ok((prompt.len(), turn.len()))
}

fn push(segments: &mut Vec<Segment>, text: &str, trained: bool) {
    if !text.is_empty() {
        segments.push(Segment {
            text: text.to_string(),
            trained,
        });
    }
}

fn template_error(e: ModelError, what: &str) -> String {
    let reason = match e {
        ModelError::ChatRender(reason) => reason,
        other => other.to_string(),
    };
    format!("the model's chat_template (tokenizer_config.json) fails on {what}: {reason}")
}

fn unmaskable(i: usize, why: &str) -> String {
    format!(
        "cannot tell which tokens of assistant message messages[{i}] to train on with the model's chat_template \
         (tokenizer_config.json): {why}"
    )
}

/// Says where `prefix`, the rendering of `what`, departs from the whole conversation's.
fn not_a_prefix(what: &str, prefix: &str, full: &str) -> String {
    let at = prefix
        .char_indices()
        .zip(full.chars())
        .find(|((_, a), b)| a != b)
        .map(|((i, _), _)| i)
        .unwrap_or(prefix.len().min(full.len()));
    format!(
        "rendering {what} is not the start of rendering the whole conversation; from byte {at} it has {:?} where the whole has {:?}",
        excerpt(prefix, at),
        excerpt(full, at)
    )
}

/// Up to 40 characters of `s` from byte `at` (a character boundary of `s`).
fn excerpt(s: &str, at: usize) -> String {
    s.get(at..).unwrap_or_default().chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
                          {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

    fn msg(role: Role, content: &str) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::compile(source, "<s>", "</s>").expect("compiles")
    }

    fn texts(r: &Rendered) -> Vec<(&str, bool)> {
        r.segments.iter().map(|s| (s.text.as_str(), s.trained)).collect()
    }

    #[test]
    fn assistant_turns_and_their_closing_marker_are_trained_on() {
        let messages = [
            msg(Role::User, "Hi"),
            msg(Role::Assistant, "Hello"),
            msg(Role::User, "Bye"),
            msg(Role::Assistant, "Ciao"),
        ];
        let r = render_with_template(&messages, &template(CHATML), Some("</s>")).expect("renders");
        assert_eq!(
            texts(&r),
            [
                ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", false),
                ("Hello<|im_end|>\n", true),
                ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", false),
                ("Ciao<|im_end|>\n", true),
            ]
        );
        assert_eq!(
            r.framing,
            Framing {
                special_tokens: false,
                eos: Some(true)
            }
        );
    }

    #[test]
    fn a_preference_answer_is_trained_on_but_assistant_turns_of_its_prompt_are_not() {
        let messages = [
            msg(Role::User, "Hi"),
            msg(Role::Assistant, "Hello"),
            msg(Role::User, "Bye"),
            msg(Role::Assistant, "Ciao"),
        ];
        let r = render_answers_with_template(&messages, &template(CHATML), Some("</s>"), 3).expect("renders");
        assert_eq!(
            texts(&r),
            [
                (
                    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
                    false
                ),
                ("Ciao<|im_end|>\n", true),
            ]
        );
        assert_eq!(r.framing.eos, Some(true));
    }

    #[test]
    fn eos_is_not_appended_when_the_template_ends_with_it() {
        let messages = [msg(Role::User, "Hi"), msg(Role::Assistant, "Hello")];
        let r = render_with_template(&messages, &template(CHATML), Some("<|im_end|>")).expect("renders");
        assert_eq!(r.framing.eos, None);
        // A conversation ending with the user's message: EOS is appended but not trained on.
        let messages = [msg(Role::Assistant, "Welcome"), msg(Role::User, "Thanks")];
        let r = render_with_template(&messages, &template(CHATML), Some("</s>")).expect("renders");
        assert_eq!(r.framing.eos, Some(false));
        assert_eq!(texts(&r)[1], ("Welcome<|im_end|>\n", true));
    }

    #[test]
    fn a_template_that_renders_past_turns_differently_is_rejected_naming_the_message() {
        // Like templates that drop past reasoning: only the last message keeps its content.
        let source = "{% for m in messages %}[{{ m.role }}]{% if loop.last %}{{ m.content }}{% endif %}{% endfor %}\
                      {% if add_generation_prompt %}[assistant]{% endif %}";
        let messages = [
            msg(Role::User, "Hi"),
            msg(Role::Assistant, "Hello"),
            msg(Role::User, "Bye"),
        ];
        let err = render_with_template(&messages, &template(source), None).expect_err("unmaskable");
        assert!(
            err.contains("messages[1]") && err.contains("tokenizer_config.json"),
            "{err}"
        );
        assert!(
            err.contains("\"Hi[assistant]\"") && err.contains("\"[assistant][user]Bye\""),
            "{err}"
        );
    }

    #[test]
    fn raise_exception_is_reported_with_the_templates_message() {
        let source =
            "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}";
        let messages = [msg(Role::System, "s"), msg(Role::User, "u"), msg(Role::Assistant, "a")];
        let err = render_with_template(&messages, &template(source), None).expect_err("raises");
        assert!(
            err.contains("System role not supported") && err.contains("chat_template (tokenizer_config.json)"),
            "{err}"
        );
    }
}
