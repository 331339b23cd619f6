//! HTTP fakes of the two outside APIs. They check what the real services
//! check (authentication, required headers, documented limits) and answer
//! with the real shapes, so the code under test cannot lean on leniency.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::response::IntoResponse as _;
use serde_json::{Value, json};
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::{NOTION_DATABASE, NOTION_TOKEN, OPENAI_KEY};

fn openai_error(status: u16, kind: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(openai_error_body(kind, message))
}

/// The body of an OpenAI error.
fn openai_error_body(kind: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": null}})
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
    /// Faithful, each answer after this many milliseconds.
    Delayed(u64),
}

impl Model {
    /// Each answer takes 150 ms: work is in flight long enough for a crash
    /// to land in the middle of it.
    pub const SLOW: Model = Model::Delayed(150);
    /// Never answers in time: every call hangs for a minute.
    pub const HANG: Model = Model::Delayed(60_000);
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
fn rate_headers(remaining_requests: u32) -> [(&'static str, String); 6] {
    [
        ("x-ratelimit-limit-requests", "10000".into()),
        ("x-ratelimit-remaining-requests", remaining_requests.to_string()),
        ("x-ratelimit-reset-requests", "50ms".into()),
        ("x-ratelimit-limit-tokens", "2000000".into()),
        ("x-ratelimit-remaining-tokens", "1999000".into()),
        ("x-ratelimit-reset-tokens", "1ms".into()),
    ]
}

fn with_rate_headers(t: ResponseTemplate, remaining_requests: u32) -> ResponseTemplate {
    rate_headers(remaining_requests).into_iter().fold(t, |t, (name, value)| t.insert_header(name, value.as_str()))
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
    delimited(user["content"].as_str()?).map(str::to_owned)
}

/// The text between the data markers of one message's content.
fn delimited(content: &str) -> Option<&str> {
    let open = content.find("<<<HALAKHA_TEXT ")?;
    let id_start = open + "<<<HALAKHA_TEXT ".len();
    let id_len = content[id_start..].find(">>>\n")?;
    let id = &content[id_start..id_start + id_len];
    let start = id_start + id_len + ">>>\n".len();
    let end = content.rfind(&format!("\n<<<END_HALAKHA_TEXT {id}>>>"))?;
    Some(&content[start..end])
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

/// A model that obeys injected instructions: its answer cites a source
/// the text does not name and claims the wrong language.
fn injected(text: &str) -> Option<Value> {
    if !text.to_lowercase().contains("ignore previous instructions") {
        return None;
    }
    let mut pwned = enrichment(text);
    pwned["title"] = "PWNED".into();
    pwned["sources"] = serde_json::json!([{"name": "Sefer HaPwn", "reference": null}]);
    pwned["language"] = if language(text) == "he" { "en".into() } else { "he".into() };
    Some(pwned)
}

/// What the fake model answers for `text`: the enrichment JSON (also the
/// bench's payloads for its floor of the pipeline).
pub fn enrichment(text: &str) -> Value {
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
        if let Some(pwned) = injected(&text) {
            return completion(&body, pwned.to_string());
        }
        if let Model::Delayed(ms) = self.model {
            return completion(&body, enrichment(&text).to_string()).set_delay(std::time::Duration::from_millis(ms));
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
            Model::Faithful | Model::Chaos | Model::QuotaOnce | Model::Delayed(_) => enrichment(&text).to_string(),
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
    with_rate_headers(ResponseTemplate::new(200), 9999).set_body_json(completion_body(&body["model"], content))
}

/// The body of a `chat.completion` answering `content`.
fn completion_body(model: &Value, content: String) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_764_000_000,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content, "refusal": null},
            "logprobs": null,
            "finish_reason": "stop"
        }],
        "usage": {"prompt_tokens": 120, "completion_tokens": 80, "total_tokens": 200},
        "system_fingerprint": "fp_fake"
    })
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

/// A fake of OpenAI's chat completions for load (the bench), with the
/// answers of [`Model::Faithful`] (after `delay`, when given). Unlike the
/// wiremock fakes, which answer on one thread of their own and rebuild
/// every answer, it serves on the caller's runtime (all its worker
/// threads) and builds each text's answer once: under load the fake's own
/// cost would otherwise be counted as the pipeline's, on the same cores.
/// It checks what the wiremock fake checks: the key, a strict JSON schema,
/// a delimited text.
pub struct LeanOpenAi {
    uri: String,
    pub calls: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl LeanOpenAi {
    /// The server's address, as wiremock's `MockServer::uri` gives it.
    pub fn uri(&self) -> String {
        self.uri.clone()
    }
}

impl Drop for LeanOpenAi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(serde::Deserialize)]
struct LeanRequest<'a> {
    #[serde(borrow)]
    model: &'a serde_json::value::RawValue,
    messages: Vec<LeanMessage<'a>>,
    response_format: Option<LeanFormat<'a>>,
}

#[derive(serde::Deserialize)]
struct LeanMessage<'a> {
    #[serde(borrow)]
    role: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct LeanFormat<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    json_schema: Option<LeanSchema<'a>>,
}

#[derive(serde::Deserialize)]
struct LeanSchema<'a> {
    strict: Option<bool>,
    #[serde(borrow)]
    schema: Option<&'a serde_json::value::RawValue>,
}

struct LeanState {
    delay: Option<std::time::Duration>,
    calls: Arc<AtomicUsize>,
    /// Each (model, text)'s answer, built once.
    answers: std::sync::Mutex<std::collections::HashMap<(String, String), bytes::Bytes>>,
}

fn lean_error(status: u16, kind: &str, message: &str) -> axum::response::Response {
    let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(openai_error_body(kind, message))).into_response()
}

async fn lean_completion(
    axum::extract::State(state): axum::extract::State<Arc<LeanState>>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> axum::response::Response {
    state.calls.fetch_add(1, Ordering::Relaxed);
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth.and_then(|a| a.strip_prefix("Bearer ")) != Some(OPENAI_KEY) {
        return lean_error(401, "invalid_request_error", "Incorrect API key provided.");
    }
    let Ok(request) = serde_json::from_slice::<LeanRequest<'_>>(&body) else {
        return lean_error(400, "invalid_request_error", "We could not parse the JSON body of your request.");
    };
    let strict = request.response_format.as_ref().is_some_and(|f| {
        f.kind == "json_schema"
            && f.json_schema.as_ref().is_some_and(|s| {
                s.strict == Some(true) && s.schema.is_some_and(|v| v.get().trim_start().starts_with('{'))
            })
    });
    if !strict {
        return lean_error(
            400,
            "invalid_request_error",
            "response_format json_schema with strict: true is required by this fake",
        );
    }
    let text =
        request.messages.iter().find(|m| m.role == "user").and_then(|m| m.content.as_deref()).and_then(delimited);
    let Some(text) = text else {
        return lean_error(400, "invalid_request_error", "the user message has no delimited halakha text");
    };
    let key = (request.model.get().to_owned(), text.to_owned());
    let cached = state.answers.lock().ok().and_then(|a| a.get(&key).cloned());
    let answer = match cached {
        Some(answer) => answer,
        None => {
            let model: Value = serde_json::from_str(request.model.get()).unwrap_or(Value::Null);
            let content = injected(text).unwrap_or_else(|| enrichment(text)).to_string();
            let answer = bytes::Bytes::from(completion_body(&model, content).to_string());
            if let Ok(mut a) = state.answers.lock() {
                a.insert(key, answer.clone());
            }
            answer
        }
    };
    if let Some(delay) = state.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = ([("content-type", "application/json")], answer).into_response();
    for (name, value) in rate_headers(9999) {
        if let Ok(value) = axum::http::HeaderValue::from_str(&value) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// Start a [`LeanOpenAi`] on 127.0.0.1 (a free port).
pub async fn openai_lean(delay: Option<std::time::Duration>) -> LeanOpenAi {
    let calls = Arc::new(AtomicUsize::new(0));
    let state = Arc::new(LeanState { delay, calls: calls.clone(), answers: Default::default() });
    let app = axum::Router::new().route("/v1/chat/completions", axum::routing::post(lean_completion)).with_state(state);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.expect("bind the lean OpenAI fake");
    let addr = listener.local_addr().expect("the lean OpenAI fake's address");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    LeanOpenAi { uri: format!("http://{addr}"), calls, server }
}

fn notion_error(status: u16, code: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status)
        .set_body_json(json!({"object": "error", "status": status, "code": code, "message": message}))
}

/// Authentication and version, as every Notion route checks them.
fn notion_checks_headers(request: &Request) -> Result<(), Box<ResponseTemplate>> {
    let auth = request.headers.get("authorization").and_then(|v| v.to_str().ok());
    if auth != Some(&format!("Bearer {NOTION_TOKEN}")) {
        return Err(Box::new(notion_error(401, "unauthorized", "API token is invalid.")));
    }
    if request.headers.get("notion-version").is_none() {
        return Err(Box::new(notion_error(400, "missing_version", "Notion-Version header failed validation.")));
    }
    Ok(())
}

/// Checks shared by every Notion route with a body.
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

/// A page the fake Notion holds.
#[derive(Debug, Clone)]
pub struct FakePage {
    pub id: String,
    pub url: String,
    pub halakha_id: String,
    pub properties: Value,
    pub children: Vec<Value>,
}

impl FakePage {
    /// The text of every paragraph block, one line per block.
    pub fn body_text(&self) -> Vec<String> {
        self.children
            .iter()
            .filter(|b| b["type"] == "paragraph")
            .map(|b| {
                b["paragraph"]["rich_text"]
                    .as_array()
                    .map(|items| items.iter().filter_map(|i| i["text"]["content"].as_str()).collect::<String>())
                    .unwrap_or_default()
            })
            .collect()
    }
}

/// What the fake Notion holds and saw.
#[derive(Debug, Default)]
pub struct NotionState {
    pub pages: std::sync::Mutex<Vec<FakePage>>,
    pub creates: Arc<AtomicUsize>,
    /// Database (or data source) queries: the lookups by `Halakha ID`.
    pub queries: AtomicUsize,
    pub rejected_400: AtomicUsize,
    pub rate_limited: AtomicUsize,
    /// Requests allowed per wall-clock second (None: no limit).
    pub per_second: Option<u32>,
    window: std::sync::Mutex<(u64, u32)>,
    /// Hold the answer of the next create this long (the page is made
    /// first): lets a test kill publish between the create and its store.
    pub hang_next_create: std::sync::Mutex<Option<std::time::Duration>>,
    /// Statuses to answer, in order, before serving requests again (429
    /// and 529 with `Retry-After: 1`): bursts of refusals.
    pub burst: std::sync::Mutex<std::collections::VecDeque<u16>>,
    pub burst_answers: AtomicUsize,
}

impl NotionState {
    pub fn pages_for(&self, halakha_id: &str) -> Vec<FakePage> {
        self.pages
            .lock()
            .map(|p| p.iter().filter(|p| p.halakha_id == halakha_id).cloned().collect())
            .unwrap_or_default()
    }
}

/// The fake Notion API: pages, database and data-source queries, block
/// children (append and list), with the documented limits.
pub struct NotionFake {
    pub state: Arc<NotionState>,
}

fn reject(state: &NotionState, message: &str) -> ResponseTemplate {
    state.rejected_400.fetch_add(1, Ordering::SeqCst);
    notion_error(400, "validation_error", message)
}

fn halakha_id_of(properties: &Value) -> String {
    properties["Halakha ID"]["rich_text"]
        .as_array()
        .map(|items| items.iter().filter_map(|i| i["text"]["content"].as_str()).collect())
        .unwrap_or_default()
}

fn page_json(p: &FakePage) -> Value {
    json!({"object": "page", "id": p.id, "url": p.url, "archived": false, "properties": p.properties})
}

impl Respond for NotionFake {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let state = &self.state;
        if let Some(limit) = state.per_second {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
            let mut w = state.window.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if w.0 != now {
                *w = (now, 0);
            }
            w.1 += 1;
            if w.1 > limit {
                state.rate_limited.fetch_add(1, Ordering::SeqCst);
                return notion_error(
                    429,
                    "rate_limited",
                    "You have been rate limited. Please try again in a few minutes.",
                )
                .insert_header("retry-after", "1");
            }
        }
        if let Some(status) = state.burst.lock().ok().and_then(|mut b| b.pop_front()) {
            state.burst_answers.fetch_add(1, Ordering::SeqCst);
            let (code, message) = match status {
                429 => ("rate_limited", "You have been rate limited. Please try again in a few minutes."),
                _ => ("service_unavailable", "Notion is unavailable, please try again later."),
            };
            return notion_error(status, code, message).insert_header("retry-after", "1");
        }
        let path = request.url.path().to_owned();
        let is_get = request.method.as_str() == "GET";
        let body = if is_get {
            if let Err(r) = notion_checks_headers(request) {
                return *r;
            }
            Value::Null
        } else {
            match notion_checks(request) {
                Ok(b) => b,
                Err(r) => return *r,
            }
        };
        if let Err(e) = rich_text_within_limits(&body) {
            return reject(state, &e);
        }
        if body["children"].as_array().map(Vec::len).unwrap_or(0) > 100 {
            return reject(state, "body.children.length should be ≤ `100`.");
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (request.method.as_str(), segments.as_slice()) {
            ("POST", ["v1", "pages"]) => {
                let parent_ok = body["parent"]["database_id"] == NOTION_DATABASE
                    || body["parent"]["data_source_id"] == NOTION_DATABASE;
                if !parent_ok {
                    return notion_error(404, "object_not_found", "Could not find database with that ID.");
                }
                for prop in ["question", "text_post", "legend", "content", "date_post", "status", "Halakha ID"] {
                    if body["properties"].get(prop).is_none() {
                        return reject(state, &format!("{prop} is required by this fake database"));
                    }
                }
                let n = state.creates.fetch_add(1, Ordering::SeqCst) + 1;
                let id = format!("1a2b3c4d-0000-4000-8000-{n:012x}");
                let page = FakePage {
                    url: format!("https://www.notion.so/{}", id.replace('-', "")),
                    id,
                    halakha_id: halakha_id_of(&body["properties"]),
                    properties: body["properties"].clone(),
                    children: body["children"].as_array().cloned().unwrap_or_default(),
                };
                let answer = ResponseTemplate::new(200).set_body_json(page_json(&page));
                if let Ok(mut pages) = state.pages.lock() {
                    pages.push(page);
                }
                match state.hang_next_create.lock().ok().and_then(|mut h| h.take()) {
                    Some(delay) => answer.set_delay(delay),
                    None => answer,
                }
            }
            ("POST", ["v1", "databases" | "data_sources", _, "query"]) => {
                state.queries.fetch_add(1, Ordering::SeqCst);
                let wanted = body["filter"]["rich_text"]["equals"].as_str().unwrap_or_default().to_owned();
                let results: Vec<Value> = state.pages_for(&wanted).iter().map(page_json).collect();
                ResponseTemplate::new(200).set_body_json(
                    json!({"object": "list", "results": results, "next_cursor": null, "has_more": false}),
                )
            }
            ("PATCH", ["v1", "blocks", id, "children"]) => {
                let Ok(mut pages) = state.pages.lock() else { return notion_error(500, "internal_server_error", "") };
                let Some(page) = pages.iter_mut().find(|p| p.id == *id) else {
                    return notion_error(404, "object_not_found", "Could not find block with that ID.");
                };
                page.children.extend(body["children"].as_array().cloned().unwrap_or_default());
                ResponseTemplate::new(200).set_body_json(json!({"object": "list", "results": [], "has_more": false}))
            }
            ("GET", ["v1", "blocks", id, "children"]) => {
                let start: usize = request
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "start_cursor")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let pages = state.pages.lock().map(|p| p.clone()).unwrap_or_default();
                let Some(page) = pages.iter().find(|p| p.id == *id) else {
                    return notion_error(404, "object_not_found", "Could not find block with that ID.");
                };
                let slice: Vec<Value> = page.children.iter().skip(start).take(100).cloned().collect();
                let more = start + slice.len() < page.children.len();
                let next = more.then(|| (start + slice.len()).to_string());
                ResponseTemplate::new(200)
                    .set_body_json(json!({"object": "list", "results": slice, "has_more": more, "next_cursor": next}))
            }
            _ => notion_error(400, "invalid_request_url", "Invalid request URL."),
        }
    }
}

/// Serve the fake Notion on `server` with a rate limit (None: none).
pub async fn mount_notion_with(server: &MockServer, per_second: Option<u32>) -> Arc<NotionState> {
    let state = Arc::new(NotionState { per_second, ..NotionState::default() });
    Mock::given(path_regex(r"^/v1/.*")).respond_with(NotionFake { state: state.clone() }).mount(server).await;
    state
}

/// Serve the fake Notion routes on `server`; returns the count of pages created.
pub async fn mount_notion(server: &MockServer) -> Arc<AtomicUsize> {
    mount_notion_with(server, None).await.creates.clone()
}

/// A fake Notion server; returns it and the count of pages created.
pub async fn notion() -> (MockServer, Arc<AtomicUsize>) {
    let (server, state) = notion_with(None).await;
    (server, state.creates.clone())
}

/// A fake Notion server with its state, limited to `per_second` requests.
pub async fn notion_with(per_second: Option<u32>) -> (MockServer, Arc<NotionState>) {
    let server = MockServer::start().await;
    let state = mount_notion_with(&server, per_second).await;
    (server, state)
}
