//! Which AWS failures are retried, which refresh credentials, which are final.

use std::fmt;

use kd_event::text::one_line;

/// What kind of failure happened, reduced to what classification needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure<'a> {
    /// The service answered with an error: its code (when it sent one) and HTTP status.
    Service { code: Option<&'a str>, status: u16 },
    /// No answer in time.
    Timeout,
    /// Connection refused, reset, DNS, TLS: the request may or may not have arrived.
    Network,
    /// An answer that could not be parsed (a proxy's error page, a cut connection).
    Malformed,
    /// The request could not be built: a bug or an input AWS would never accept.
    Construction,
    /// The service refused the request's time (signed more than 5 minutes from its
    /// clock) and the corrected clock did not help yet: the machine's clock is at fault,
    /// never the tenant's, so it is retried, never dead-lettered as rejected.
    ClockSkew,
}

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Transient: back off and try again.
    Retryable,
    /// The credentials were refused as expired or unknown: drop them, assume the role
    /// again, then retry.
    ExpiredCredentials,
    /// The destination will not take this event as things stand (access denied, no
    /// such stream, invalid input).
    Permanent,
    /// The record is larger than the stream's maximum record size: no retry can help,
    /// it is dead-lettered `record_too_large` at once.
    RecordTooLarge,
}

const RETRYABLE_CODES: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "LimitExceededException",
    "BandwidthLimitExceeded",
    "SlowDown",
    "PriorRequestNotComplete",
    "KMSThrottlingException",
    "InternalFailure",
    "InternalFailureException",
    "InternalServerError",
    "InternalError",
    "ServiceUnavailable",
    "ServiceUnavailableException",
    "RequestTimeout",
    "RequestTimeoutException",
    "IDPCommunicationError",
    "RequestExpired",
    "KMSInternalException",
];

const EXPIRED_CREDENTIAL_CODES: &[&str] = &[
    "ExpiredToken",
    "ExpiredTokenException",
    "InvalidClientTokenId",
    "UnrecognizedClientException",
];

const PERMANENT_CODES: &[&str] = &[
    "AccessDenied",
    "AccessDeniedException",
    "ResourceNotFoundException",
    "InvalidArgumentException",
    "ValidationException",
    "ValidationError",
    "KMSDisabledException",
    "KMSNotFoundException",
    "KMSAccessDeniedException",
    "KMSInvalidStateException",
    "KMSOptInRequired",
    "MalformedPolicyDocument",
    "PackedPolicyTooLarge",
    "RegionDisabledException",
];

/// Codes the worker gives failures of its own (no AWS answer, a refusal before any
/// call), and AWS's refusals of a request's time (retried after the clock is
/// corrected: `crate::clock`).
const OWN_CODES: &[&str] = &[
    "InvalidSignatureException",
    "SignatureDoesNotMatch",
    "AuthFailure",
    "Timeout",
    "NetworkError",
    "ResponseError",
    "ConstructionFailure",
    "MissingCredentials",
    "NoResourcePolicyRole",
    "OwnAccountStreamRefused",
    "RecordTooLarge",
    "StreamNotDescribed",
    "WriterRoleRefused",
];

/// An error code as a metric label: the codes the worker knows (AWS's it classifies,
/// its own, `HTTP_` and a status), and `Other` for any other, so that what an answer
/// says cannot add series without bound.
pub fn code_label(code: &str) -> &str {
    let known = [
        RETRYABLE_CODES,
        EXPIRED_CREDENTIAL_CODES,
        PERMANENT_CODES,
        OWN_CODES,
    ]
    .iter()
    .any(|codes| codes.contains(&code));
    let status = code
        .strip_prefix("HTTP_")
        .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()));
    if known || status {
        code
    } else {
        "Other"
    }
}

/// The single decision of which failures are worth retrying. Known codes first, then
/// the HTTP status: 5xx and 429 are transient, any other 4xx is final; a failure with
/// no answer at all is transient.
pub fn classify(failure: Failure<'_>) -> ErrorClass {
    match failure {
        Failure::Service { code, status } => {
            if let Some(code) = code {
                if RETRYABLE_CODES.contains(&code) {
                    return ErrorClass::Retryable;
                }
                if EXPIRED_CREDENTIAL_CODES.contains(&code) {
                    return ErrorClass::ExpiredCredentials;
                }
                if PERMANENT_CODES.contains(&code) {
                    return ErrorClass::Permanent;
                }
            }
            match status {
                429 | 500..=599 => ErrorClass::Retryable,
                400..=499 => ErrorClass::Permanent,
                _ => ErrorClass::Retryable,
            }
        }
        Failure::Timeout | Failure::Network | Failure::Malformed | Failure::ClockSkew => {
            ErrorClass::Retryable
        }
        Failure::Construction => ErrorClass::Permanent,
    }
}

/// A failed AWS call, classified, with an error code for metrics and a one-line message
/// for logs and dead letters. Never holds credentials or a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsError {
    pub class: ErrorClass,
    /// The AWS error code, or a fixed word for failures without one (`Timeout`,
    /// `NetworkError`, `ResponseError`, `ConstructionFailure`, `HTTP_503`): a bounded
    /// set, safe as a metric label.
    pub code: String,
    pub message: String,
    /// The AWS request ID of the answer (`x-amzn-RequestId`), where there was one.
    pub request_id: Option<String>,
}

impl fmt::Display for AwsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for AwsError {}

/// Whether an error answer refuses the request's time: the codes and messages AWS uses
/// for a signature too old or too new (Kinesis: `InvalidSignatureException` "Signature
/// expired: ... is now earlier than ..." / "Signature not yet current"; other services:
/// `RequestExpired`, `RequestTimeTooSkewed`, `RequestInTheFuture`). botocore's and the
/// Rust SDK's clock-skew errors are the same set.
pub fn is_skew_refusal(code: Option<&str>, message: Option<&str>) -> bool {
    let by_code = matches!(
        code,
        Some("RequestTimeTooSkewed" | "RequestExpired" | "RequestInTheFuture")
    );
    let by_message = message.is_some_and(|m| {
        m.contains("Signature expired")
            || m.contains("Signature not yet current")
            || m.contains("too skewed")
    });
    by_code
        || (by_message
            && matches!(
                code,
                Some("InvalidSignatureException" | "SignatureDoesNotMatch" | "AuthFailure") | None
            ))
}

/// STS error codes that mean the *worker's own* credentials are wrong (revoked, expired,
/// unsigned), not the tenant's role: no tenant can be served until they are fixed.
const WORKER_IDENTITY_CODES: &[&str] = &[
    "InvalidClientTokenId",
    "ExpiredToken",
    "ExpiredTokenException",
    "UnrecognizedClientException",
    "SignatureDoesNotMatch",
    "IncompleteSignature",
    "MissingAuthenticationToken",
];

impl AwsError {
    /// Whether the caller's own credentials are wrong (revoked, expired, unsigned), not
    /// a tenant's role: no tenant can be served until they are fixed. A refusal of the
    /// request's time (STS says `SignatureDoesNotMatch` "Signature expired") is the
    /// clock's, not this.
    pub fn refuses_worker_identity(&self) -> bool {
        WORKER_IDENTITY_CODES.contains(&self.code.as_str()) && !self.refuses_time()
    }

    /// Whether any access was refused: the caller's identity ([`is_access_denied`]) or
    /// a key the call needs (`KMSAccessDeniedException`).
    ///
    /// [`is_access_denied`]: Self::is_access_denied
    pub fn refuses_access(&self) -> bool {
        self.is_access_denied() || self.code.contains("AccessDenied")
    }

    /// Whether AWS refused the request's time (see [`is_skew_refusal`]).
    pub fn refuses_time(&self) -> bool {
        is_skew_refusal(Some(&self.code), Some(&self.message))
    }

    /// Whether Kinesis refused a record for its shard's capacity.
    pub fn is_shard_throttle(&self) -> bool {
        self.code == "ProvisionedThroughputExceededException"
    }

    /// Whether the caller's IAM policy does not allow this operation (a role that may
    /// `PutRecord` but not `PutRecords`, say), as Kinesis answers it.
    pub fn refuses_operation(&self) -> bool {
        self.code == "AccessDeniedException"
    }

    /// A record whose outcome is unknown (`InternalFailure`, retried): missing from a
    /// `PutRecords` answer, or left in a batch that was abandoned.
    pub fn unknown_outcome(context: &str, why: &str) -> Self {
        AwsError::from_record(context, "InternalFailure", Some(why))
    }

    /// Whether the caller's identity may not make this call (`AccessDenied`): the
    /// role's policy, not the stream's state, which may change any time.
    pub fn is_access_denied(&self) -> bool {
        matches!(
            self.code.as_str(),
            "AccessDenied" | "AccessDeniedException" | "UnauthorizedOperation"
        )
    }

    /// Builds the error from an SDK error of any operation.
    pub fn from_sdk<E, R>(context: &str, err: &aws_sdk_kinesis::error::SdkError<E, R>) -> Self
    where
        E: aws_sdk_kinesis::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: HttpStatus + std::fmt::Debug,
    {
        use aws_sdk_kinesis::error::SdkError;
        let (failure, code, message) = match err {
            SdkError::ServiceError(se) => {
                let status = se.raw().status_code();
                let code = se.err().code();
                let raw_message = se.err().message();
                let message = raw_message
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("HTTP {status}"));
                let failure = if is_skew_refusal(code, raw_message) {
                    Failure::ClockSkew
                } else {
                    Failure::Service { code, status }
                };
                (
                    failure,
                    code.map(str::to_owned)
                        .unwrap_or_else(|| format!("HTTP_{status}")),
                    message,
                )
            }
            SdkError::TimeoutError(_) => (
                Failure::Timeout,
                "Timeout".to_owned(),
                "no response in time".to_owned(),
            ),
            SdkError::DispatchFailure(d) => (
                Failure::Network,
                "NetworkError".to_owned(),
                chain(d.as_connector_error().map(|e| e as &dyn std::error::Error)),
            ),
            SdkError::ResponseError(r) => (
                Failure::Malformed,
                "ResponseError".to_owned(),
                format!("unreadable response (HTTP {})", r.raw().status_code()),
            ),
            _ => (
                Failure::Construction,
                "ConstructionFailure".to_owned(),
                chain(std::error::Error::source(err)),
            ),
        };
        AwsError {
            request_id: None,
            class: classify(failure),
            code,
            message: one_line(&format!("{context}: {message}")),
        }
    }

    /// The error with the request ID of the answer that carried it.
    pub fn with_request_id(mut self, headers: &http::HeaderMap) -> Self {
        self.request_id = headers
            .get("x-amzn-requestid")
            .and_then(|v| v.to_str().ok())
            .map(|v| kd_event::text::escape_clip(v, 64));
        self
    }

    /// Builds the error of a failed call; `context` (what was asked of whom) is only
    /// formatted now, not on every call.
    pub fn new(
        context: &(dyn Fn() -> String + Sync),
        failure: Failure<'_>,
        code: &str,
        message: &str,
    ) -> Self {
        AwsError {
            request_id: None,
            class: classify(failure),
            code: code.to_owned(),
            message: one_line(&format!("{}: {message}", context())),
        }
    }

    /// Builds the error of a request that could not be built (an input AWS would never
    /// accept): final.
    pub fn construction(context: &str, err: &dyn std::error::Error) -> Self {
        AwsError {
            request_id: None,
            class: classify(Failure::Construction),
            code: "ConstructionFailure".to_owned(),
            message: one_line(&format!("{context}: {}", chain(Some(err)))),
        }
    }

    /// Builds the error of one record that a `PutRecords` call refused while the call
    /// itself succeeded (`ProvisionedThroughputExceededException`, `InternalFailure`, a
    /// KMS error). A code we do not know is taken as transient, as a 5xx would be.
    pub fn from_record(context: &str, code: &str, message: Option<&str>) -> Self {
        AwsError {
            request_id: None,
            class: classify(Failure::Service {
                code: Some(code),
                status: 500,
            }),
            code: code.to_owned(),
            message: one_line(&format!("{context}: {}", message.unwrap_or(code))),
        }
    }
}

/// The HTTP status of a raw response, whatever its concrete type.
pub trait HttpStatus {
    fn status_code(&self) -> u16;
}

impl HttpStatus for aws_sdk_kinesis::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

pub(crate) fn chain(err: Option<&dyn std::error::Error>) -> String {
    let mut parts = Vec::new();
    let mut cur = err;
    while let Some(e) = cur {
        parts.push(e.to_string());
        cur = e.source();
    }
    if parts.is_empty() {
        "request failed".to_owned()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_refusals_are_told_from_other_signature_failures() {
        assert!(is_skew_refusal(
            Some("InvalidSignatureException"),
            Some("Signature expired: 20261204T100000Z is now earlier than 20261204T101000Z (20261204T101500Z - 5 min.)")
        ));
        assert!(is_skew_refusal(
            Some("InvalidSignatureException"),
            Some("Signature not yet current: 20261204T103000Z is still later than 20261204T102000Z (20261204T101500Z + 5 min.)")
        ));
        assert!(is_skew_refusal(Some("RequestExpired"), None));
        assert!(is_skew_refusal(Some("RequestTimeTooSkewed"), Some("x")));
        // A wrong secret is not a clock problem.
        assert!(!is_skew_refusal(
            Some("InvalidSignatureException"),
            Some("The request signature we calculated does not match the signature you provided.")
        ));
        assert!(!is_skew_refusal(
            Some("AccessDeniedException"),
            Some("Signature expired")
        ));
    }
    use ErrorClass::*;

    fn svc(code: &str, status: u16) -> Failure<'_> {
        Failure::Service {
            code: Some(code),
            status,
        }
    }

    #[test]
    fn error_codes_become_a_fixed_set_of_labels() {
        for known in [
            "ProvisionedThroughputExceededException",
            "AccessDeniedException",
            "ExpiredTokenException",
            "Timeout",
            "HTTP_503",
        ] {
            assert_eq!(code_label(known), known);
        }
        for unknown in ["SomethingNew", "HTTP_5031", "HTTP_abc", "x\ny", ""] {
            assert_eq!(code_label(unknown), "Other", "{unknown:?}");
        }
    }

    #[test]
    fn classification_table() {
        let table: &[(Failure, ErrorClass)] = &[
            (
                svc("ProvisionedThroughputExceededException", 400),
                Retryable,
            ),
            (svc("ThrottlingException", 400), Retryable),
            (svc("Throttling", 400), Retryable),
            (svc("KMSThrottlingException", 400), Retryable),
            (svc("InternalFailure", 500), Retryable),
            (svc("ServiceUnavailable", 503), Retryable),
            (svc("ExpiredTokenException", 400), ExpiredCredentials),
            (svc("ExpiredToken", 400), ExpiredCredentials),
            (svc("AccessDenied", 403), Permanent),
            (svc("AccessDeniedException", 400), Permanent),
            (svc("ResourceNotFoundException", 400), Permanent),
            (svc("InvalidArgumentException", 400), Permanent),
            (svc("ValidationException", 400), Permanent),
            (svc("KMSDisabledException", 400), Permanent),
            (svc("KMSNotFoundException", 400), Permanent),
            (svc("KMSAccessDeniedException", 400), Permanent),
            (svc("SomethingNew", 503), Retryable),
            (svc("SomethingNew", 429), Retryable),
            (svc("SomethingNew", 400), Permanent),
            (
                Failure::Service {
                    code: None,
                    status: 502,
                },
                Retryable,
            ),
            (
                Failure::Service {
                    code: None,
                    status: 403,
                },
                Permanent,
            ),
            (Failure::Timeout, Retryable),
            (Failure::Network, Retryable),
            (Failure::Malformed, Retryable),
            (Failure::Construction, Permanent),
        ];
        for (failure, want) in table {
            assert_eq!(classify(*failure), *want, "{failure:?}");
        }
    }

    #[test]
    fn refused_records_of_a_put_records_call() {
        let ctx = "PutRecords to stream s in us-east-1";
        for (code, want) in [
            ("ProvisionedThroughputExceededException", Retryable),
            ("InternalFailure", Retryable),
            ("KMSThrottlingException", Retryable),
            ("KMSAccessDeniedException", Permanent),
            ("SomethingNew", Retryable),
        ] {
            let e = AwsError::from_record(ctx, code, Some("why\nnot"));
            assert_eq!((e.class, e.code.as_str()), (want, code));
            assert_eq!(e.message, format!("{ctx}: why not"));
        }
    }
}
