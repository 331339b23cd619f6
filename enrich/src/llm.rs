//! The chat completion call and what its answer must satisfy.

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{OpenAIError, WrappedError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{CreateChatCompletionResponse, FinishReason, ResponseFormat, ResponseFormatJsonSchema};
use halakha_common::StageError;
use halakha_common::envelope::{Enrichment, Ingested, Usage};
use halakha_common::error::{classify_http_status, parse_retry_after};
use halakha_common::metrics as m;
use secrecy::ExposeSecret;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::limits::Limits;
use crate::prompt::{self, Prompt};
use crate::rules;

/// An OpenAI-compatible chat completion client.
pub struct Llm {
    client: Client<OpenAIConfig>,
    model: String,
    max_completion_tokens: u32,
    /// The request's `response_format` (the strict JSON schema), serialised
    /// once: every call sends it unchanged.
    response_format: Box<RawValue>,
    limits: Arc<Limits>,
    quota_pause: Duration,
    /// USD per million prompt and completion tokens for this model.
    price: Option<(f64, f64)>,
}

impl Llm {
    pub fn new(config: &Config, limits: Arc<Limits>) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.openai_timeout)
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()?;
        let openai = OpenAIConfig::new()
            .with_api_base(config.openai_base_url.clone())
            .with_api_key(config.openai_api_key.expose_secret().to_owned());
        m::init_counters(
            m::OPENAI_REQUESTS_TOTAL,
            "outcome",
            &["ok", "rate_limited", "transient", "permanent", "quota"],
        );
        m::init_counters(m::OPENAI_REPAIRS_TOTAL, "outcome", &["attempted", "fixed", "failed"]);
        metrics::counter!(m::OPENAI_QUOTA_EXHAUSTED_TOTAL).increment(0);
        for kind in ["prompt", "completion"] {
            metrics::counter!(m::OPENAI_TOKENS_TOTAL, "kind" => kind, "model" => config.openai_model.clone())
                .increment(0);
        }
        if config.prices.contains_key(&config.openai_model) {
            metrics::counter!(m::OPENAI_COST_MICRODOLLARS_TOTAL, "model" => config.openai_model.clone()).increment(0);
        }
        Ok(Self {
            client: Client::with_config(openai).with_http_service(single_attempt(http, limits.clone())),
            model: config.openai_model.clone(),
            max_completion_tokens: config.max_completion_tokens,
            response_format: response_format(),
            limits,
            quota_pause: config.quota_pause,
            price: config.prices.get(&config.openai_model).copied(),
        })
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    fn request<'a>(&'a self, messages: &'a [Turn<'a>]) -> ChatRequest<'a> {
        ChatRequest {
            model: &self.model,
            messages,
            response_format: &self.response_format,
            max_completion_tokens: self.max_completion_tokens,
            temperature: TEMPERATURE,
        }
    }

    /// One chat completion: the response, or the error kind of its failure.
    /// Waits first for room in the provider budgets.
    /// `chars`: the characters of the messages' texts, for the budgets'
    /// estimate.
    async fn complete(&self, messages: &[Turn<'_>], chars: usize) -> Result<CreateChatCompletionResponse, StageError> {
        let estimate = estimate_tokens(chars, messages.len(), self.max_completion_tokens);
        self.limits.acquire(estimate).await?;
        let started = Instant::now();
        let result = self.client.chat().create_byot(self.request(messages)).await;
        metrics::histogram!(m::OPENAI_REQUEST_SECONDS).record(started.elapsed().as_secs_f64());
        match result {
            Ok(response) => {
                metrics::counter!(m::OPENAI_REQUESTS_TOTAL, "outcome" => "ok").increment(1);
                let u = usage(&response);
                let model = self.model.clone();
                metrics::counter!(m::OPENAI_TOKENS_TOTAL, "kind" => "prompt", "model" => model.clone())
                    .increment(u64::from(u.prompt_tokens));
                metrics::counter!(m::OPENAI_TOKENS_TOTAL, "kind" => "completion", "model" => model.clone())
                    .increment(u64::from(u.completion_tokens));
                if let Some((prompt_price, completion_price)) = self.price {
                    let micro =
                        f64::from(u.prompt_tokens) * prompt_price + f64::from(u.completion_tokens) * completion_price;
                    metrics::counter!(m::OPENAI_COST_MICRODOLLARS_TOTAL, "model" => model)
                        .increment(micro.round() as u64);
                }
                self.limits.record(estimate, &u).await;
                Ok(response)
            }
            Err(e) => {
                let rate_limited = http_status(&e) == Some(429);
                let err = classify(e, self.quota_pause);
                let outcome = if err.is_transient() && rate_limited {
                    "rate_limited"
                } else if err.is_transient() {
                    "transient"
                } else if err.is_paused() {
                    metrics::counter!(m::OPENAI_QUOTA_EXHAUSTED_TOTAL).increment(1);
                    "quota"
                } else {
                    "permanent"
                };
                metrics::counter!(m::OPENAI_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
                Err(err)
            }
        }
    }

    /// Structure one text: a completion, checked; on a broken rule, one
    /// repair turn naming every violation; still broken, a permanent error
    /// naming the rules. Returns the enrichment and the tokens of every call.
    pub async fn enrich(&self, prompt: &Prompt, input: &Ingested) -> Result<(Enrichment, Usage), StageError> {
        let (mut messages, chars) = conversation(prompt, input);
        let first = self.complete(&messages, chars).await?;
        let mut total = usage(&first);
        let violations = match check_answer(&first, input) {
            Ok(enrichment) => return Ok((enrichment, total)),
            Err(Rejected::Final(e)) => return Err(e),
            Err(Rejected::Repairable(v)) => v,
        };
        metrics::counter!(m::OPENAI_REPAIRS_TOTAL, "outcome" => "attempted").increment(1);
        tracing::info!(id = %input.id, violations = %violations.join("; "), "Model output breaks the rules; one repair turn");
        let previous = first.choices.first().and_then(|c| c.message.content.as_deref()).unwrap_or_default();
        let repair = prompt.repair_message(&violations);
        let chars = chars + previous.chars().count() + repair.chars().count();
        // The repair turn goes on with the first turn's conversation.
        messages.push(Turn { role: "assistant", content: Cow::Borrowed(previous) });
        messages.push(Turn { role: "user", content: Cow::Owned(repair) });
        let second = self.complete(&messages, chars).await?;
        total = add(total, usage(&second));
        match check_answer(&second, input) {
            Ok(enrichment) => {
                metrics::counter!(m::OPENAI_REPAIRS_TOTAL, "outcome" => "fixed").increment(1);
                Ok((enrichment, total))
            }
            Err(Rejected::Final(e)) => Err(e),
            Err(Rejected::Repairable(v)) => {
                metrics::counter!(m::OPENAI_REPAIRS_TOTAL, "outcome" => "failed").increment(1);
                Err(StageError::permanent(format!(
                    "the model output breaks the rules after one repair turn: {}",
                    v.join("; ")
                )))
            }
        }
    }
}

/// The sampling temperature of every call.
const TEMPERATURE: f32 = 0.2;

/// A chat completion request as sent: the model's settings, the messages
/// borrowed where they can be (the instructions are the same for every
/// call) and the response format serialised once. The same JSON as
/// async-openai's `CreateChatCompletionRequest` with these fields (a test
/// compares them), without building and serialising the schema's value
/// tree and copying the instructions for every call.
#[derive(Debug, serde::Serialize)]
struct ChatRequest<'a> {
    model: &'a str,
    messages: &'a [Turn<'a>],
    response_format: &'a RawValue,
    max_completion_tokens: u32,
    temperature: f32,
}

/// One message of the conversation (system, user or assistant), with text
/// content.
#[derive(Debug, serde::Serialize)]
struct Turn<'a> {
    role: &'static str,
    content: Cow<'a, str>,
}

/// The `response_format` of every request: the strict JSON schema
/// ([`prompt::schema`]), serialised as async-openai's type serialises it.
fn response_format() -> Box<RawValue> {
    let format = ResponseFormat::JsonSchema {
        json_schema: ResponseFormatJsonSchema {
            description: Some("A halakha structured for publication".into()),
            name: prompt::SCHEMA_NAME.into(),
            schema: prompt::schema(),
            strict: Some(true),
        },
    };
    // A value of async-openai's own type, whose serialisation cannot fail
    // (were it to, `null` would make the provider refuse every call).
    serde_json::value::to_raw_value(&format).unwrap_or_default()
}

/// The first turn's messages (the instructions, then the delimited text)
/// and their texts' characters, for the token estimate.
fn conversation<'a>(prompt: &'a Prompt, input: &Ingested) -> (Vec<Turn<'a>>, usize) {
    let user_text = prompt.user_message(input);
    let chars = prompt.system_chars + user_text.chars().count();
    let system = Turn { role: "system", content: Cow::Borrowed(prompt.system.as_str()) };
    let user = Turn { role: "user", content: Cow::Owned(user_text) };
    (vec![system, user], chars)
}

fn add(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens.saturating_add(b.prompt_tokens),
        completion_tokens: a.completion_tokens.saturating_add(b.completion_tokens),
        total_tokens: a.total_tokens.saturating_add(b.total_tokens),
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
    limits: Arc<Limits>,
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
        let limits = limits.clone();
        async move {
            let request = factory.build().await?;
            let response = http.execute(request).await.map_err(OpenAIError::Reqwest)?;
            limits.observe(response.headers()).await;
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

/// A rough count of the tokens a call will use, for the budgets; the
/// real count corrects it afterwards.
/// From the characters of the messages' texts (each message's role and
/// framing counted as a few more), without serialising them: about three
/// characters a token, plus the completion's share.
fn estimate_tokens(chars: usize, messages: usize, max_completion: u32) -> u32 {
    const FRAMING_CHARS: usize = 24;
    let chars = chars.saturating_add(messages.saturating_mul(FRAMING_CHARS));
    u32::try_from(chars / 3).unwrap_or(u32::MAX).saturating_add(max_completion.min(1000))
}

/// Map a client error to a kind, following the delivery rules. A 429 that
/// says the quota is exhausted pauses the stage: retrying would only burn
/// deliveries until someone adds credit.
/// The HTTP status of a failed call, when the provider answered.
fn http_status(e: &OpenAIError) -> Option<u16> {
    match e {
        OpenAIError::Boxed(boxed) => boxed.downcast_ref::<HttpFailure>().map(|f| f.status),
        OpenAIError::ApiError(api) => Some(api.status_code.as_u16()),
        _ => None,
    }
}

fn classify(e: OpenAIError, quota_pause: Duration) -> StageError {
    match e {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<HttpFailure>() {
            Ok(f) => {
                let parsed = serde_json::from_str::<WrappedError>(&f.body).ok();
                let detail = parsed.as_ref().map(|w| w.error.to_string()).unwrap_or_else(|| truncate(&f.body, 300));
                let reason = format!("OpenAI answered {}: {detail}", f.status);
                let quota = parsed.as_ref().is_some_and(|w| {
                    w.error.r#type.as_deref() == Some("insufficient_quota")
                        || w.error.code.as_deref() == Some("insufficient_quota")
                });
                if f.status == 429 && quota {
                    return StageError::paused(reason, quota_pause);
                }
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

/// Why an answer was not accepted.
#[derive(Debug)]
pub enum Rejected {
    /// A repair turn cannot help (refusal, cut output, content filter).
    Final(StageError),
    /// Broken rules a repair turn may fix, each named.
    Repairable(Vec<String>),
}

/// Check an answer before trusting it: one choice, finished normally, not
/// a refusal, valid JSON of the schema, within the domain rules.
pub fn check_answer(r: &CreateChatCompletionResponse, input: &Ingested) -> Result<Enrichment, Rejected> {
    let choice =
        r.choices.first().ok_or_else(|| Rejected::Final(StageError::transient("the completion has no choices")))?;
    if let Some(refusal) = choice.message.refusal.as_deref().filter(|s| !s.is_empty()) {
        return Err(Rejected::Final(StageError::permanent(format!("the model refused: {}", truncate(refusal, 300)))));
    }
    match choice.finish_reason {
        Some(FinishReason::Stop) | None => {}
        Some(FinishReason::Length) => {
            return Err(Rejected::Final(StageError::permanent("the model output was cut at the token limit")));
        }
        Some(FinishReason::ContentFilter) => {
            return Err(Rejected::Final(StageError::permanent("the model output was withheld by the content filter")));
        }
        Some(other) => {
            return Err(Rejected::Final(StageError::permanent(format!("unexpected finish_reason {other:?}"))));
        }
    }
    let content = choice.message.content.as_deref().unwrap_or_default();
    let enrichment: Enrichment = serde_json::from_str(content)
        .map_err(|e| Rejected::Repairable(vec![format!("the answer is not valid JSON for the schema: {e}")]))?;
    let violations = rules::check(&enrichment, input);
    if violations.is_empty() { Ok(enrichment) } else { Err(Rejected::Repairable(violations)) }
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
            "sources": [{"name": "Psalms", "reference": "16:8"}],
            "difficulty_level": 2, "text_post": "p", "legend": "l", "language": "en"
        })
        .to_string()
    }

    fn input() -> Ingested {
        rules::tests::ingested("I have set Hashem before me always. Psalms 16:8.", None)
    }

    #[test]
    fn the_token_estimate_counts_the_texts_as_their_serialised_messages_would() {
        // The default prompt and every text of the corpus: counted from
        // the texts, the estimate stays within a tenth of the one made by
        // serialising the messages (what it was before it stopped
        // serialising them).
        let prompt = Prompt::builtin();
        let mut checked = 0;
        for text in rules::tests::corpus_texts() {
            let (messages, chars) = conversation(&prompt, &rules::tests::ingested(&text, None));
            let serialised: usize =
                messages.iter().map(|m| serde_json::to_string(m).map(|s| s.chars().count()).unwrap_or(0)).sum();
            let (now, before) = (f64::from(estimate_tokens(chars, messages.len(), 0)), (serialised / 3) as f64);
            assert!((now - before).abs() <= before / 10.0, "estimate {now} tokens, by serialising {before}");
            checked += 1;
        }
        assert!(checked > 400, "{checked} texts");
        // The completion's share is added, capped at 1000.
        assert_eq!(estimate_tokens(1000, 2, 5000) - estimate_tokens(1000, 2, 0), 1000);
    }

    #[test]
    fn the_request_sent_is_the_json_of_async_openais_request_with_the_same_fields() {
        use async_openai::types::chat::{
            ChatCompletionRequestAssistantMessage, ChatCompletionRequestAssistantMessageContent,
            ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
            ChatCompletionRequestSystemMessageContent, ChatCompletionRequestUserMessage,
            ChatCompletionRequestUserMessageContent, CreateChatCompletionRequest,
        };
        let prompt = Prompt::builtin();
        let input = input();
        // A repair turn's conversation: every kind of message.
        let (mut turns, _) = conversation(&prompt, &input);
        turns.push(Turn { role: "assistant", content: "{\"title\": \"ת\"}".into() });
        turns.push(Turn { role: "user", content: prompt.repair_message(&["a rule".to_owned()]).into() });
        let format = response_format();
        let ours = ChatRequest {
            model: "gpt-4o-mini",
            messages: &turns,
            response_format: &format,
            max_completion_tokens: 1500,
            temperature: TEMPERATURE,
        };
        let user = |text: String| {
            ChatCompletionRequestMessage::User(ChatCompletionRequestUserMessage {
                content: ChatCompletionRequestUserMessageContent::Text(text),
                name: None,
            })
        };
        let typed = CreateChatCompletionRequest {
            model: "gpt-4o-mini".into(),
            messages: vec![
                ChatCompletionRequestMessage::System(ChatCompletionRequestSystemMessage {
                    content: ChatCompletionRequestSystemMessageContent::Text(prompt.system.clone()),
                    name: None,
                }),
                user(prompt.user_message(&input)),
                ChatCompletionRequestMessage::Assistant(ChatCompletionRequestAssistantMessage {
                    content: Some(ChatCompletionRequestAssistantMessageContent::Text("{\"title\": \"ת\"}".into())),
                    ..Default::default()
                }),
                user(prompt.repair_message(&["a rule".to_owned()])),
            ],
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    description: Some("A halakha structured for publication".into()),
                    name: prompt::SCHEMA_NAME.into(),
                    schema: prompt::schema(),
                    strict: Some(true),
                },
            }),
            max_completion_tokens: Some(1500),
            temperature: Some(0.2),
            ..Default::default()
        };
        let ours = serde_json::to_value(&ours).expect("our request serialises");
        assert_eq!(ours, serde_json::to_value(&typed).expect("the typed request serialises"));
        assert_eq!(ours["response_format"]["json_schema"]["strict"], true, "{ours}");
    }

    #[test]
    fn a_valid_answer_passes() {
        let e = check_answer(&response(&valid(), "stop"), &input()).expect("valid");
        assert_eq!(e.sources[0].reference.as_deref(), Some("16:8"));
    }

    #[test]
    fn invalid_json_is_repairable_and_says_why() {
        match check_answer(&response("{not json", "stop"), &input()) {
            Err(Rejected::Repairable(v)) => assert!(v[0].contains("not valid JSON"), "{v:?}"),
            other => panic!("expected a repairable rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_truncated_answer_is_final_before_parsing() {
        match check_answer(&response(&valid(), "length"), &input()) {
            Err(Rejected::Final(e)) => assert!(e.full_reason().contains("token limit")),
            other => panic!("expected a final rejection, got {other:?}"),
        }
    }
}
