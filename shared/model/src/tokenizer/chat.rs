//! Chat templates: the Jinja template a model ships (GGUF `tokenizer.chat_template` or `tokenizer_config.json`),
//! rendered with minijinja and Python-compatible string methods.

use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::TokenizerError;

/// ChatML, used when a model ships no template.
pub(crate) const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + \
    message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text of the turn.
    pub content: String,
}

impl ChatMessage {
    /// A `user` turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// A `system` turn.
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: "system".into(),
            content: content.into(),
        }
    }
}

/// Special-token strings templates may reference.
pub(crate) struct SpecialTokens {
    pub bos_token: String,
    pub eos_token: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env
}

/// Checks that a template compiles.
pub(crate) fn check(template: &str) -> Result<(), TokenizerError> {
    let mut env = environment();
    env.add_template("chat", template)
        .map_err(|e| TokenizerError::Template(e.to_string()))
}

pub(crate) fn render(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    special: &SpecialTokens,
) -> Result<String, TokenizerError> {
    let mut env = environment();
    env.add_template("chat", template)
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| TokenizerError::Template(e.to_string()))?;
    tmpl.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => special.bos_token,
        eos_token => special.eos_token,
    })
    .map_err(|e| TokenizerError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_fallback_and_python_methods() {
        let special = SpecialTokens {
            bos_token: "<s>".into(),
            eos_token: "</s>".into(),
        };
        let out = render(CHATML, &[ChatMessage::user("hi")], true, &special).unwrap();
        assert_eq!(out, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
        let t = "{{ bos_token }}{% for m in messages %}{{ m['content'].strip() }}{% endfor %}";
        let out = render(t, &[ChatMessage::user("  x  ")], false, &special).unwrap();
        assert_eq!(out, "<s>x");
        let t = "{{ raise_exception('only user turns') }}";
        assert!(render(t, &[], false, &special)
            .unwrap_err()
            .to_string()
            .contains("only user turns"));
    }
}
