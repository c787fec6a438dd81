//! Chat templates: mergekit's built-in names (our own Jinja, rendering exactly
//! what mergekit 0.1.5's templates render under transformers' `trim_blocks` and
//! `lstrip_blocks`, odd whitespace included) and the rule that tells a name from
//! a literal template.

use super::OutputError;

/// ChatML.
const CHATML: &str = r#"{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"#;

/// Alpaca. The last system message is the preamble; a generation prompt follows
/// the last message without a blank line, as mergekit's does.
const ALPACA: &str = r#"{% set system = messages | selectattr('role', 'equalto', 'system') | list %}{{ (system | last).content | trim if system else '' }}{{ '\n\n' }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] | trim }}{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] | trim }}{% elif message['role'] == 'user_context' %}{{ '### Input:\n' + message['content'] | trim }}{% endif %}{% if not loop.last and message['role'] in ['user', 'assistant', 'user_context'] %}{{ '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '### Response:\n' }}{% endif %}"#;

/// Llama 3. Content is trimmed; the BOS token opens the first message.
const LLAMA3: &str = r#"{% for message in messages %}{{ (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"#;

/// Mistral [INST] format, system message folded into the first user turn.
const MISTRAL: &str = r#"{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}{% else %}{% set loop_messages = messages %}{% endif %}{{ bos_token }}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{% if loop.first and system_message is defined %}{{ ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}{% endif %}{% endfor %}"#;

/// EXAONE. mergekit's template indents its expressions, and since
/// `lstrip_blocks` does not strip before `{{`, that indentation is part of what
/// it renders; the literal spaces here reproduce it.
const EXAONE: &str = r#"{% for message in messages %}{% if loop.first and message['role'] != 'system' %}{{ '        [|system|][|endofturn|]\n\n' }}{% endif %}{{ '    [|' + message['role'] + '|]' + message['content'] + '\n' }}{% if message['role'] == 'user' %}{{ '        \n\n' }}{% else %}{{ '        [|endofturn|]\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '    [|assistant|]\n' }}{% endif %}"#;

/// The template for one of mergekit's built-in names.
pub fn builtin_chat_template(name: &str) -> Option<&'static str> {
    Some(match name {
        "chatml" => CHATML,
        "alpaca" => ALPACA,
        "llama3" => LLAMA3,
        "mistral" => MISTRAL,
        "exaone" => EXAONE,
        _ => return None,
    })
}

/// The template text for a configured `chat_template`: a built-in name (looked up
/// only when under 256 characters, without newline or `{`, as mergekit 0.1.5
/// does), else a literal template of at least 20 characters containing `{`.
/// `auto` needs the input models' templates, which only the caller has.
pub fn resolve_chat_template(value: &str) -> Result<String, OutputError> {
    if value == "auto" {
        return Err(OutputError::AutoChatTemplate);
    }
    let name_like = value.chars().count() < 256 && !value.contains('\n') && !value.contains('{');
    if name_like {
        if let Some(t) = builtin_chat_template(value) {
            return Ok(t.to_string());
        }
    }
    if value.chars().count() < 20 || !value.contains('{') {
        return Err(OutputError::InvalidChatTemplate {
            template: preview(value),
        });
    }
    Ok(value.to_string())
}

/// A value short enough for an error message: at most 60 characters, with
/// how long the whole value is when it was cut.
fn preview(value: &str) -> String {
    const SHOWN: usize = 60;
    let n = value.chars().count();
    if n <= SHOWN {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(SHOWN).collect();
    format!("{head:?}... ({n} characters)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_invalid_template_is_not_echoed_whole() {
        let huge = "x".repeat(1 << 20);
        let e = resolve_chat_template(&huge).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", &e[..300.min(e.len())]);
        assert!(e.contains("(1048576 characters)"), "{e}");
        let e = resolve_chat_template("vicuna").unwrap_err().to_string();
        assert!(e.contains("\"vicuna\""), "{e}");
    }

    #[test]
    fn names_and_literals() {
        for name in ["chatml", "alpaca", "llama3", "mistral", "exaone"] {
            assert_eq!(
                resolve_chat_template(name).unwrap(),
                builtin_chat_template(name).unwrap()
            );
        }
        let literal = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
        assert_eq!(resolve_chat_template(literal).unwrap(), literal);
        assert!(matches!(
            resolve_chat_template("vicuna"),
            Err(OutputError::InvalidChatTemplate { .. })
        ));
        assert!(matches!(
            resolve_chat_template("{{ short }}"),
            Err(OutputError::InvalidChatTemplate { .. })
        ));
        assert!(matches!(
            resolve_chat_template("a long template without any braces at all"),
            Err(OutputError::InvalidChatTemplate { .. })
        ));
        assert!(matches!(
            resolve_chat_template("auto"),
            Err(OutputError::AutoChatTemplate)
        ));
    }
}
