//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered with minijinja
//! the way Hugging Face transformers renders it with jinja2 (`trim_blocks`, `lstrip_blocks`,
//! loop controls, `raise_exception`, `strftime_now`, a Python-`json.dumps` `tojson`, and the
//! Python string and dict methods templates call, from [`super::pycompat`]).

use super::pycompat;
use super::vocab::{string_array, KEY_TOKENS};
use crate::gguf::Metadata;
use crate::{Error, Result};
use minijinja::{context, Environment, ErrorKind};
use serde::Serialize;

pub(crate) const KEY_CHAT_TEMPLATE: &str = "tokenizer.chat_template";
const NAME: &str = "chat_template";

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the bos / eos texts it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

fn template_error(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    Error::Template(msg)
}

impl ChatTemplate {
    /// The template in `tokenizer.chat_template`, with bos / eos texts from
    /// `tokenizer.ggml.{bos,eos}_token_id` (empty where the file names none).
    pub fn from_metadata(md: &Metadata) -> Result<ChatTemplate> {
        let source = match md.get(KEY_CHAT_TEMPLATE) {
            None => {
                return Err(Error::Template(format!(
                    "the model has no chat template ({KEY_CHAT_TEMPLATE} is missing)"
                )))
            }
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::metadata(KEY_CHAT_TEMPLATE, "expected a string"))?,
        };
        let token_text = |key: &str| -> Result<String> {
            let Some(id) = md.opt(key, |v| v.as_u64())? else {
                return Ok(String::new());
            };
            let tokens = string_array(md, KEY_TOKENS)?;
            Ok(usize::try_from(id)
                .ok()
                .and_then(|i| tokens.get(i))
                .map(|s| s.to_string())
                .unwrap_or_default())
        };
        let bos = token_text("tokenizer.ggml.bos_token_id")?;
        let eos = token_text("tokenizer.ggml.eos_token_id")?;
        ChatTemplate::new(source, bos, eos)
    }

    /// Compiles `source`; a syntax error is an [`Error::Template`].
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<ChatTemplate> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(pycompat::call_method);
        env.add_filter("tojson", pycompat::tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", pycompat::strftime_now);
        env.add_template_owned(NAME, source.clone())
            .map_err(template_error)?;
        Ok(ChatTemplate {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The prompt text of `messages`, ending with the assistant's turn opener when
    /// `add_generation_prompt`. A template's `raise_exception("...")` is an
    /// [`Error::Template`] carrying its message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt)
    }

    /// As [`render`](Self::render), for messages of any serializable shape (content as a
    /// list of parts, tool calls, ...).
    pub fn render_with<M: Serialize + ?Sized>(
        &self,
        messages: &M,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let tmpl = self.env.get_template(NAME).map_err(template_error)?;
        tmpl.render(context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(template_error)
    }
}
