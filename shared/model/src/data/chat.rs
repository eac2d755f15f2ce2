//! Chat records (`{"messages": [{"role", "content"}, ...]}`) rendered with the model's chat template, the loss on
//! the assistant turns only.

use crate::tokenizer::{ChatMessage, Tokenizer};

/// A rendered conversation.
pub(super) struct ChatRendered {
    /// Token ids of the whole conversation as the template renders it (no BOS added: templates write their own).
    pub ids: Vec<u32>,
    /// Per id: whether it belongs to an assistant turn (its content and the template's end of turn).
    pub in_loss: Vec<bool>,
    /// Ids before the last assistant turn: the prompt a model continues to give it.
    pub last_prompt_len: usize,
    /// The last assistant turn's content.
    pub last_answer: String,
}

/// The messages of a record's `messages` value; the reason when it is not an array of {role, content} strings
/// with at least one assistant turn.
pub(super) fn messages(value: &serde_json::Value, field: &str) -> Result<Vec<ChatMessage>, String> {
    let items = value
        .as_array()
        .filter(|a| !a.is_empty())
        .ok_or_else(|| format!("field `{field}` must be a non-empty array of messages"))?;
    let mut out = Vec::with_capacity(items.len());
    for (i, m) in items.iter().enumerate() {
        let text = |key: &str| {
            m.get(key)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| format!("`{field}`[{i}] needs a string `{key}`"))
        };
        out.push(ChatMessage {
            role: text("role")?,
            content: text("content")?,
        });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err(format!("`{field}` has no assistant turn to learn from"));
    }
    Ok(out)
}

/// Renders `messages` with the tokenizer's chat template and marks the ids of each assistant turn: the text from
/// where the template, asked for a generation prompt after the turns before it, stops, to where it ends the turn.
/// Templates must render a conversation's first turns as a prefix of the whole (all common ones do).
pub(super) fn render(messages: &[ChatMessage], tokenizer: &Tokenizer) -> Result<ChatRendered, String> {
    let render = |turns: &[ChatMessage], generation_prompt: bool| {
        tokenizer
            .apply_chat_template(turns, generation_prompt)
            .map_err(|e| e.to_string())
    };
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
        let start = render(&messages[..i], true)?;
        let end = render(&messages[..=i], false)?;
        if !full.starts_with(&start) || !end.starts_with(&start) || !full.starts_with(&end) {
            return Err(format!(
                "the chat template does not render turn {i} as a prefix of the whole conversation, so the assistant \
                 turns cannot be marked for the loss"
            ));
        }
        spans.push((start.len(), end.len(), m.content.clone()));
    }
    let (ids, offsets) = tokenizer.encode_with_offsets(&full).map_err(|e| e.to_string())?;
    let in_loss: Vec<bool> = offsets
        .iter()
        .map(|&(s, _)| spans.iter().any(|&(a, b, _)| s >= a && s < b))
        .collect();
    let (last_start, _, last_answer) = spans.pop().expect("messages() requires an assistant turn");
    let last_prompt_len = offsets.iter().take_while(|&&(s, _)| s < last_start).count();
    Ok(ChatRendered {
        ids,
        in_loss,
        last_prompt_len,
        last_answer,
    })
}
