//! API errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status: 4xx for what the client sent, 5xx for our own faults.
    pub status: StatusCode,
    /// What went wrong and what is allowed.
    pub message: String,
    /// OpenAI's error `type` (`invalid_request_error`, `server_error`, …).
    pub kind: &'static str,
    /// The request field at fault (`temperature`, `messages[0].content[1]`), when one is.
    pub param: Option<String>,
    /// A machine-readable code, when there is one.
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (sent as `Retry-After`).
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    /// A 400 naming the field at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after_s: None,
        }
    }

    /// A 4xx that names no single field.
    pub fn client(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// A 500: our own fault.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after_s: None,
        }
    }

    /// Sets the machine-readable code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A library error met while serving a request: a bad input is the client's (400, with
    /// `param` = `messages` since media and prompt come from there), an engine that shut down
    /// is 503 (retry elsewhere or later), anything else ours.
    pub fn from_library(e: &qwen2vl::Error) -> Self {
        match e {
            qwen2vl::Error::BadInput { .. } => ApiError::invalid("messages", e.to_string()),
            qwen2vl::Error::Shutdown(_) => ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                ..ApiError::internal(e.to_string())
            },
            other => ApiError::internal(format!("internal error: {other}")),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body().to_string();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        if let Some(s) = self.retry_after_s {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_errors_map_to_their_statuses() {
        let bad = ApiError::from_library(&qwen2vl::Error::bad_input("x is 3", "x below 2"));
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert_eq!(bad.param.as_deref(), Some("messages"));
        let down = ApiError::from_library(&qwen2vl::Error::Shutdown(
            "before the request started".into(),
        ));
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(down.message.contains("shut down"), "{}", down.message);
        let ours = ApiError::from_library(&qwen2vl::Error::Internal("broken".into()));
        assert_eq!(ours.status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}
