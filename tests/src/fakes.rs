//! HTTP fakes of the two outside APIs. They check what the real services
//! check (authentication, required headers, documented limits) and answer
//! with the real shapes, so the code under test cannot lean on leniency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::{NOTION_DATABASE, NOTION_TOKEN, OPENAI_KEY};

fn openai_error(status: u16, kind: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}}))
}

/// How the fake model answers.
#[derive(Clone, Copy, Debug)]
pub enum Model {
    /// A valid enrichment derived from the text.
    Faithful,
    /// A message whose content is not JSON, every time.
    InvalidJson,
    /// 503 "overloaded" with `Retry-After: 0`, every time.
    Overloaded,
    /// Leaves out `legend` on the first turn, fixes it in the repair turn.
    MissingFieldOnce,
    /// The first two attempts of each text fail often: 429 rate limits, 500
    /// errors, or answers that hang past any sane timeout (about 40% of
    /// first attempts); later attempts succeed. Deterministic per text.
    Chaos,
    /// The first call answers 429 `insufficient_quota`; later calls succeed.
    QuotaOnce,
}

/// What the chaos fake did, by kind.
#[derive(Debug, Default)]
pub struct ChaosCounts {
    pub rate_limited: AtomicUsize,
    pub server_errors: AtomicUsize,
    pub hung: AtomicUsize,
}

/// The fake `POST /v1/chat/completions`.
pub struct ChatCompletions {
    model: Model,
    pub calls: Arc<AtomicUsize>,
    attempts: std::sync::Mutex<std::collections::HashMap<String, u32>>,
    pub chaos: Arc<ChaosCounts>,
}

/// The rate-limit headers OpenAI sends with every answer.
fn with_rate_headers(t: ResponseTemplate, remaining_requests: u32) -> ResponseTemplate {
    t.insert_header("x-ratelimit-limit-requests", "10000")
        .insert_header("x-ratelimit-remaining-requests", remaining_requests.to_string().as_str())
        .insert_header("x-ratelimit-reset-requests", "50ms")
        .insert_header("x-ratelimit-limit-tokens", "2000000")
        .insert_header("x-ratelimit-remaining-tokens", "1999000")
        .insert_header("x-ratelimit-reset-tokens", "1ms")
}

fn hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same text fails the same way every run.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// The text between the data markers of the (first) user message:
/// `<<<HALAKHA_TEXT id>>>` ... `<<<END_HALAKHA_TEXT id>>>`.
pub fn delimited_text(body: &Value) -> Option<String> {
    let user = body["messages"].as_array()?.iter().find(|m| m["role"] == "user")?;
    let content = user["content"].as_str()?;
    let open = content.find("<<<HALAKHA_TEXT ")?;
    let id_start = open + "<<<HALAKHA_TEXT ".len();
    let id_len = content[id_start..].find(">>>\n")?;
    let id = &content[id_start..id_start + id_len];
    let start = id_start + id_len + ">>>\n".len();
    let end = content.rfind(&format!("\n<<<END_HALAKHA_TEXT {id}>>>"))?;
    Some(content[start..end].to_owned())
}

/// True when this request is the repair turn of a conversation.
fn is_repair(body: &Value) -> bool {
    body["messages"].as_array().is_some_and(|m| m.iter().any(|m| m["role"] == "assistant"))
}

/// What a faithful model answers: the language of most letters.
fn language(text: &str) -> &'static str {
    let hebrew = text.chars().filter(|c| ('\u{5d0}'..='\u{5ea}').contains(c)).count();
    let latin = text.chars().filter(char::is_ascii_alphabetic).count();
    if hebrew > latin {
        "he"
    } else if text.chars().any(|c| "éèêàçùôî".contains(c)) {
        "fr"
    } else {
        "en"
    }
}

fn enrichment(text: &str) -> Value {
    let words: Vec<&str> = text.split_whitespace().collect();
    let head = words.iter().take(8).copied().collect::<Vec<_>>().join(" ");
    let answer: String = text.chars().take(400).collect();
    json!({
        "title": head,
        "question": format!("What does this teach: {head}?"),
        "answer": answer,
        "tags": ["halakha"],
        "themes": ["daily conduct"],
        "sources": [],
        "difficulty_level": 2,
        "text_post": format!("{answer}\n\n{head}"),
        "legend": format!("{head} #halakha"),
        "language": language(text),
    })
}

impl Respond for ChatCompletions {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let auth = request.headers.get("authorization").and_then(|v| v.to_str().ok());
        if auth != Some(&format!("Bearer {OPENAI_KEY}")) {
            return openai_error(401, "invalid_request_error", "Incorrect API key provided.");
        }
        let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
            return openai_error(400, "invalid_request_error", "We could not parse the JSON body of your request.");
        };
        let format = &body["response_format"];
        if format["type"] != "json_schema"
            || format["json_schema"]["strict"] != true
            || !format["json_schema"]["schema"].is_object()
        {
            return openai_error(
                400,
                "invalid_request_error",
                "response_format json_schema with strict: true is required by this fake",
            );
        }
        let Some(text) = delimited_text(&body) else {
            return openai_error(400, "invalid_request_error", "the user message has no delimited halakha text");
        };
        // A model that obeys injected instructions: its answer cites a source
        // the text does not name and claims the wrong language.
        if text.to_lowercase().contains("ignore previous instructions") {
            let mut pwned = enrichment(&text);
            pwned["title"] = "PWNED".into();
            pwned["sources"] = serde_json::json!([{"name": "Sefer HaPwn", "reference": null}]);
            pwned["language"] = if language(&text) == "he" { "en".into() } else { "he".into() };
            return completion(&body, pwned.to_string());
        }
        let call = self.calls.load(Ordering::SeqCst);
        if matches!(self.model, Model::QuotaOnce) && call == 1 {
            return openai_error(
                429,
                "insufficient_quota",
                "You exceeded your current quota, please check your plan and billing details.",
            )
            .insert_header("retry-after", "0");
        }
        if matches!(self.model, Model::Chaos) {
            let attempt = {
                let mut map = self.attempts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let n = map.entry(text.clone()).or_insert(0);
                *n += 1;
                *n
            };
            if attempt <= 2 {
                match (hash(&text) >> (attempt * 8)) % 10 {
                    0 | 1 => {
                        self.chaos.rate_limited.fetch_add(1, Ordering::SeqCst);
                        let t = openai_error(
                            429,
                            "requests",
                            "Rate limit reached for requests per min (RPM). Please try again in 20ms.",
                        )
                        .insert_header("retry-after", "0");
                        return with_rate_headers(t, 0);
                    }
                    2 => {
                        self.chaos.server_errors.fetch_add(1, Ordering::SeqCst);
                        return openai_error(
                            500,
                            "server_error",
                            "The server had an error while processing your request.",
                        );
                    }
                    3 => {
                        self.chaos.hung.fetch_add(1, Ordering::SeqCst);
                        return completion(&body, enrichment(&text).to_string())
                            .set_delay(std::time::Duration::from_secs(3));
                    }
                    _ => {}
                }
            }
        }
        let content = match self.model {
            Model::Faithful | Model::Chaos | Model::QuotaOnce => enrichment(&text).to_string(),
            Model::MissingFieldOnce if is_repair(&body) => enrichment(&text).to_string(),
            Model::MissingFieldOnce => {
                let mut v = enrichment(&text);
                v.as_object_mut().map(|o| o.remove("legend"));
                v.to_string()
            }
            Model::InvalidJson => "Sure! Here is the halakha: {title: oops".to_owned(),
            Model::Overloaded => {
                return openai_error(
                    503,
                    "server_error",
                    "The engine is currently overloaded, please try again later.",
                )
                .insert_header("retry-after", "0");
            }
        };
        completion(&body, content)
    }
}

/// A `chat.completion` answering `content`.
fn completion(body: &Value, content: String) -> ResponseTemplate {
    with_rate_headers(ResponseTemplate::new(200), 9999).set_body_json(json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1_764_000_000,
            "model": body["model"],
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200},
            "system_fingerprint": "fp_fake"
    }))
}

/// Serve the fake chat completions on `server`; returns the call count.
pub async fn mount_openai(server: &MockServer, model: Model) -> Arc<AtomicUsize> {
    mount_openai_counted(server, model).await.0
}

/// Like [`mount_openai`], with what the chaos model did.
pub async fn mount_openai_counted(server: &MockServer, model: Model) -> (Arc<AtomicUsize>, Arc<ChaosCounts>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let chaos = Arc::new(ChaosCounts::default());
    let responder = ChatCompletions { model, calls: calls.clone(), attempts: Default::default(), chaos: chaos.clone() };
    Mock::given(method("POST")).and(path("/v1/chat/completions")).respond_with(responder).mount(server).await;
    (calls, chaos)
}

/// A fake OpenAI server; returns it and the count of completion calls.
pub async fn openai(model: Model) -> (MockServer, Arc<AtomicUsize>) {
    let server = MockServer::start().await;
    let calls = mount_openai(&server, model).await;
    (server, calls)
}

/// A fake OpenAI server with the chaos counts.
pub async fn openai_counted(model: Model) -> (MockServer, Arc<AtomicUsize>, Arc<ChaosCounts>) {
    let server = MockServer::start().await;
    let (calls, chaos) = mount_openai_counted(&server, model).await;
    (server, calls, chaos)
}

fn notion_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"object": "error", "status": status, "code": code, "message": message}))
}

/// Checks shared by every Notion route.
fn notion_checks(request: &Request) -> Result<Value, Box<ResponseTemplate>> {
    let auth = request.headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {NOTION_TOKEN}")) {
        return Err(Box::new(notion_error(401, "unauthorized", "API token is invalid.")));
    }
    if request.headers.get("notion-version").is_none() {
        return Err(Box::new(notion_error(400, "missing_version", "Notion-Version header failed validation.")));
    }
    serde_json::from_slice(&request.body)
        .map_err(|_| Box::new(notion_error(400, "invalid_json", "Error parsing JSON body.")))
}

/// Every rich-text array within Notion's documented limits.
fn rich_text_within_limits(v: &Value) -> Result<(), String> {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if (k == "rich_text" || k == "title") && child.is_array() {
                    let items = child.as_array().map(Vec::len).unwrap_or(0);
                    if items > 100 {
                        return Err(format!("{k} has {items} items; the limit is 100"));
                    }
                    for item in child.as_array().into_iter().flatten() {
                        let len = item["text"]["content"].as_str().map(|s| s.encode_utf16().count()).unwrap_or(0);
                        if len > 2000 {
                            return Err(format!("a text content has {len} characters; the limit is 2000"));
                        }
                    }
                }
                rich_text_within_limits(child)?;
            }
            Ok(())
        }
        Value::Array(items) => items.iter().try_for_each(rich_text_within_limits),
        _ => Ok(()),
    }
}

/// The fake `POST /v1/pages`.
pub struct CreatePage {
    pub creates: Arc<AtomicUsize>,
}

impl Respond for CreatePage {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body = match notion_checks(request) {
            Ok(b) => b,
            Err(r) => return *r,
        };
        if body["parent"]["database_id"] != NOTION_DATABASE {
            return notion_error(404, "object_not_found", "Could not find database with that ID.");
        }
        if body["children"].as_array().map(Vec::len).unwrap_or(0) > 100 {
            return notion_error(400, "validation_error", "body.children.length should be ≤ `100`.");
        }
        if let Err(e) = rich_text_within_limits(&body) {
            return notion_error(400, "validation_error", &e);
        }
        for prop in ["question", "text_post", "legend", "content", "date_post", "status", "Halakha ID"] {
            if body["properties"].get(prop).is_none() {
                return notion_error(400, "validation_error", &format!("{prop} is required by this fake database"));
            }
        }
        let n = self.creates.fetch_add(1, Ordering::SeqCst) + 1;
        let id = format!("1a2b3c4d-0000-4000-8000-{n:012x}");
        ResponseTemplate::new(200).set_body_json(json!({
            "object": "page",
            "id": id,
            "created_time": "2026-11-24T06:00:00.000Z",
            "parent": {"type": "database_id", "database_id": NOTION_DATABASE},
            "archived": false,
            "properties": body["properties"],
            "url": format!("https://www.notion.so/{}", id.replace('-', "")),
        }))
    }
}

/// The fake `POST /v1/databases/{id}/query` (nothing is ever found: the
/// pipeline must not need it on a first attempt).
pub struct QueryDatabase;

impl Respond for QueryDatabase {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if let Err(r) = notion_checks(request) {
            return *r;
        }
        ResponseTemplate::new(200)
            .set_body_json(json!({"object": "list", "results": [], "next_cursor": null, "has_more": false}))
    }
}

/// Serve the fake Notion routes on `server`; returns the count of pages created.
pub async fn mount_notion(server: &MockServer) -> Arc<AtomicUsize> {
    let creates = Arc::new(AtomicUsize::new(0));
    Mock::given(method("POST"))
        .and(path("/v1/pages"))
        .respond_with(CreatePage { creates: creates.clone() })
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/v1/databases/[^/]+/query$"))
        .respond_with(QueryDatabase)
        .mount(server)
        .await;
    creates
}

/// A fake Notion server; returns it and the count of pages created.
pub async fn notion() -> (MockServer, Arc<AtomicUsize>) {
    let server = MockServer::start().await;
    let creates = mount_notion(&server).await;
    (server, creates)
}
