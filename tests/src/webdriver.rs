//! A small WebDriver (W3C) client over chromedriver's HTTP API: enough for the dashboard's
//! browser test to open pages, find, click and type, read text, run a script and take
//! screenshots in a real headless Chromium.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// The key under which WebDriver returns an element's id.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver: Child,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session with a
    /// profile in `profile_dir` and no background networking (this machine has no internet).
    pub async fn start(chromedriver: &str, profile_dir: &Path) -> Browser {
        let port = fleet_server::server::free_loopback_port().unwrap();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {chromedriver}: {e}"));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        crate::wait_for("chromedriver to be ready", Duration::from_secs(30), || async {
            let status: Value = http.get(format!("{base}/status")).send().await.ok()?.json().await.ok()?;
            status["value"]["ready"].as_bool().filter(|ready| *ready)
        })
        .await
        .unwrap();
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1400,1000".into(),
            format!("--user-data-dir={}", profile_dir.display()),
        ];
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let created: Value =
            http.post(format!("{base}/session")).json(&capabilities).send().await.unwrap().json().await.unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver did not start a session: {created}"))
            .to_string();
        Browser { http, session: format!("{base}/session/{session}"), driver }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request.send().await.map_err(|e| e.to_string())?.json().await.map_err(|e| e.to_string())?;
        match answer["value"].get("error") {
            Some(error) => Err(format!("{error}: {}", answer["value"]["message"])),
            None => Ok(answer["value"].clone()),
        }
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await.unwrap();
    }

    async fn find(&self, css: &str) -> Result<String, String> {
        let found = self
            .call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": css })))
            .await?;
        found[ELEMENT].as_str().map(str::to_string).ok_or_else(|| format!("no element id in {found}"))
    }

    /// Waits (polling) until `css` matches an element; its id.
    pub async fn element(&self, css: &str) -> String {
        crate::wait_for(&format!("the page to show {css}"), Duration::from_secs(30), || async {
            self.find(css).await.ok()
        })
        .await
        .unwrap()
    }

    /// Waits until the element matching `css` has text containing `wanted`; the text.
    pub async fn wait_text(&self, css: &str, wanted: &str) -> String {
        crate::wait_for(&format!("{css} to say {wanted:?}"), Duration::from_secs(30), || async {
            let text = self.text(css).await.ok()?;
            text.contains(wanted).then_some(text)
        })
        .await
        .unwrap()
    }

    pub async fn text(&self, css: &str) -> Result<String, String> {
        let id = self.find(css).await?;
        let text = self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None).await?;
        Ok(text.as_str().unwrap_or_default().to_string())
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), Some(json!({}))).await.unwrap();
    }

    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/value"), Some(json!({ "text": text }))).await.unwrap();
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        self.call(reqwest::Method::POST, "/execute/sync", Some(json!({ "script": script, "args": [] }))).await.unwrap()
    }

    /// Accepts a `confirm()` the page opened.
    pub async fn accept_alert(&self) {
        crate::wait_for("a confirmation dialog", Duration::from_secs(10), || async {
            self.call(reqwest::Method::POST, "/alert/accept", Some(json!({}))).await.ok().map(|_| ())
        })
        .await
        .unwrap();
    }

    pub async fn screenshot(&self, path: &Path) {
        let png = self.call(reqwest::Method::GET, "/screenshot", None).await.unwrap();
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or_default()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    pub async fn quit(mut self) {
        let _ = self.call(reqwest::Method::DELETE, "", None).await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
