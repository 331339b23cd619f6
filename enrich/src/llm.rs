//! The chat completion call and what its answer must satisfy.

use std::future::Future;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{OpenAIError, WrappedError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage, ChatCompletionRequestSystemMessageContent,
    ChatCompletionRequestUserMessage, ChatCompletionRequestUserMessageContent, CreateChatCompletionRequest,
    CreateChatCompletionResponse, FinishReason, ResponseFormat, ResponseFormatJsonSchema,
};
use halakha_common::StageError;
use halakha_common::envelope::{Enrichment, Ingested, Usage};
use halakha_common::error::{classify_http_status, parse_retry_after};
use halakha_common::metrics as m;
use secrecy::ExposeSecret;

use crate::config::Config;
use crate::prompt::{self, Prompt};

/// Longest accepted value of the short text fields, in characters.
const MAX_SHORT: usize = 500;
/// Longest accepted value of the long text fields, in characters.
const MAX_LONG: usize = 20_000;

/// An OpenAI-compatible chat completion client.
pub struct Llm {
    client: Client<OpenAIConfig>,
    model: String,
    max_completion_tokens: u32,
}

impl Llm {
    pub fn new(config: &Config) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.openai_timeout)
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        let openai = OpenAIConfig::new()
            .with_api_base(config.openai_base_url.clone())
            .with_api_key(config.openai_api_key.expose_secret().to_owned());
        Ok(Self {
            client: Client::with_config(openai).with_http_service(single_attempt(http)),
            model: config.openai_model.clone(),
            max_completion_tokens: config.max_completion_tokens,
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    fn request(&self, prompt: &Prompt, input: &Ingested) -> CreateChatCompletionRequest {
        let system = ChatCompletionRequestSystemMessage {
            content: ChatCompletionRequestSystemMessageContent::Text(prompt.system.clone()),
            name: None,
        };
        let user = ChatCompletionRequestUserMessage {
            content: ChatCompletionRequestUserMessageContent::Text(prompt.user_message(input)),
            name: None,
        };
        CreateChatCompletionRequest {
            model: self.model.clone(),
            messages: vec![ChatCompletionRequestMessage::System(system), ChatCompletionRequestMessage::User(user)],
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: Some("A halakha structured for publication".into()),
                    name: prompt::SCHEMA_NAME.into(),
                    schema: prompt::schema(),
                    strict: Some(true),
                },
            }),
            max_completion_tokens: Some(self.max_completion_tokens),
            temperature: Some(0.2),
            ..Default::default()
        }
    }

    /// One structured completion: the enrichment and the usage it cost.
    pub async fn enrich(&self, prompt: &Prompt, input: &Ingested) -> Result<(Enrichment, Usage), StageError> {
        let started = Instant::now();
        let result = self.client.chat().create(self.request(prompt, input)).await;
        metrics::histogram!(m::OPENAI_REQUEST_SECONDS).record(started.elapsed().as_secs_f64());
        let response = match result {
            Ok(r) => r,
            Err(e) => {
                let err = classify(e);
                let outcome = if err.is_transient() { "transient" } else { "permanent" };
                metrics::counter!(m::OPENAI_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
                return Err(err);
            }
        };
        metrics::counter!(m::OPENAI_REQUESTS_TOTAL, "outcome" => "ok").increment(1);
        let usage = usage(&response);
        metrics::counter!(m::OPENAI_TOKENS_TOTAL, "kind" => "prompt").increment(u64::from(usage.prompt_tokens));
        metrics::counter!(m::OPENAI_TOKENS_TOTAL, "kind" => "completion").increment(u64::from(usage.completion_tokens));
        let enrichment = parse(&response)?;
        Ok((enrichment, usage))
    }
}

/// A failed HTTP answer, kept whole: status, `Retry-After` and body.
#[derive(Debug, thiserror::Error)]
#[error("HTTP {status}")]
struct HttpFailure {
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

/// The transport: exactly one HTTP request per call.
///
/// async-openai retries 429, 5xx and connection errors on its own by
/// default; the stage runner owns retries (nak with delay, `max_deliver`,
/// dead-letter), so hidden retries would multiply attempts and cost. A
/// failed answer is returned as [`HttpFailure`] so its `Retry-After`
/// reaches the runner.
fn single_attempt(
    http: reqwest::Client,
) -> impl tower::Service<
    HttpRequestFactory,
    Response = reqwest::Response,
    Error = OpenAIError,
    Future = impl Future<Output = Result<reqwest::Response, OpenAIError>> + Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(move |factory: HttpRequestFactory| {
        let http = http.clone();
        async move {
            let request = factory.build().await?;
            let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after);
            let body = response.text().await.unwrap_or_default();
            Err(OpenAIError::Boxed(Box::new(HttpFailure { status: status.as_u16(), retry_after, body })))
        }
    })
}

fn usage(r: &CreateChatCompletionResponse) -> Usage {
    r.usage
        .as_ref()
        .map(|u| Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        })
        .unwrap_or_default()
}

/// Map a client error to a kind, following the delivery rules.
fn classify(e: OpenAIError) -> StageError {
    match e {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<HttpFailure>() {
            Ok(f) => {
                let detail = serde_json::from_str::<WrappedError>(&f.body)
                    .map(|w| w.error.to_string())
                    .unwrap_or_else(|_| truncate(&f.body, 300));
                let reason = format!("OpenAI answered {}: {detail}", f.status);
                match classify_http_status(f.status) {
                    Some(false) => StageError::permanent(reason),
                    _ => StageError::transient_after(reason, f.retry_after),
                }
            }
            Err(other) => StageError::transient(format!("the OpenAI request failed: {other}")),
        },
        OpenAIError::ApiError(api) => {
            let status = api.status_code.as_u16();
            let reason = format!("OpenAI answered {status}: {}", api.api_error);
            match classify_http_status(status) {
                Some(false) => StageError::permanent(reason),
                _ => StageError::transient(reason),
            }
        }
        OpenAIError::Reqwest(e) => {
            let what = if e.is_timeout() { "timed out" } else { "failed" };
            StageError::transient(format!("the OpenAI request {what}")).with_source(e)
        }
        OpenAIError::JSONDeserialize(e, _) => {
            StageError::transient("OpenAI sent a response that is not a chat completion").with_source(e)
        }
        OpenAIError::InvalidArgument(msg) => StageError::permanent(format!("invalid OpenAI request: {msg}")),
        other => StageError::transient("the OpenAI request failed").with_source(other),
    }
}

/// Check the answer before trusting it: one choice, finished normally, not
/// a refusal, valid JSON of the schema, and within the domain rules.
pub fn parse(r: &CreateChatCompletionResponse) -> Result<Enrichment, StageError> {
    let choice = r.choices.first().ok_or_else(|| StageError::transient("the completion has no choices"))?;
    if let Some(refusal) = choice.message.refusal.as_deref().filter(|s| !s.is_empty()) {
        return Err(StageError::permanent(format!("the model refused: {}", truncate(refusal, 300))));
    }
    match choice.finish_reason {
        Some(FinishReason::Stop) | None => {}
        Some(FinishReason::Length) => return Err(StageError::permanent("the model output was cut at the token limit")),
        Some(FinishReason::ContentFilter) => {
            return Err(StageError::permanent("the model output was withheld by the content filter"));
        }
        Some(other) => return Err(StageError::permanent(format!("unexpected finish_reason {other:?}"))),
    }
    let content = choice.message.content.as_deref().unwrap_or_default();
    let enrichment: Enrichment = serde_json::from_str(content)
        .map_err(|e| StageError::permanent(format!("the model output is not valid JSON for the schema: {e}")))?;
    check(&enrichment)?;
    Ok(enrichment)
}

/// Domain rules the schema cannot express.
fn check(e: &Enrichment) -> Result<(), StageError> {
    let mut violations = Vec::new();
    for (name, value, max) in [
        ("title", &e.title, MAX_SHORT),
        ("question", &e.question, MAX_LONG),
        ("answer", &e.answer, MAX_LONG),
        ("text_post", &e.text_post, MAX_LONG),
        ("legend", &e.legend, MAX_LONG),
    ] {
        let n = value.trim().chars().count();
        if n == 0 {
            violations.push(format!("{name} is empty"));
        } else if n > max {
            violations.push(format!("{name} has {n} characters (at most {max})"));
        }
    }
    if !(1..=5).contains(&e.difficulty_level) {
        violations.push(format!("difficulty_level is {} (expected 1 to 5)", e.difficulty_level));
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(StageError::permanent(format!("the model output breaks the rules: {}", violations.join("; "))))
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(content: &str, finish: &str) -> CreateChatCompletionResponse {
        serde_json::from_value(serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": null}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        }))
        .expect("a chat.completion")
    }

    fn valid() -> String {
        serde_json::json!({
            "title": "t", "question": "q", "answer": "a", "tags": ["x"], "themes": ["y"],
            "sources": [{"name": "Kitzur Shulchan Arukh", "reference": "1:1"}],
            "difficulty_level": 2, "text_post": "p", "legend": "l", "language": "en"
        })
        .to_string()
    }

    #[test]
    fn a_valid_answer_parses() {
        let e = parse(&response(&valid(), "stop")).expect("valid");
        assert_eq!(e.sources[0].reference.as_deref(), Some("1:1"));
    }

    #[test]
    fn invalid_json_is_permanent_and_says_why() {
        let e = parse(&response("{not json", "stop")).expect_err("invalid");
        assert!(!e.is_transient());
        assert!(e.full_reason().contains("not valid JSON"));
    }

    #[test]
    fn a_truncated_answer_is_refused_before_parsing() {
        let e = parse(&response(&valid(), "length")).expect_err("cut");
        assert!(e.full_reason().contains("token limit"));
    }

    #[test]
    fn empty_fields_and_bad_difficulty_are_named() {
        let mut v: serde_json::Value = serde_json::from_str(&valid()).expect("json");
        v["title"] = "".into();
        v["difficulty_level"] = 9.into();
        let e = parse(&response(&v.to_string(), "stop")).expect_err("rules");
        let r = e.full_reason();
        assert!(r.contains("title is empty") && r.contains("difficulty_level is 9"), "{r}");
    }
}
