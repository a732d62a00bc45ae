//! What the SDK clients still in use (STS, and Kinesis for `check` and `tail`) do like
//! the worker's own calls: say who is calling in `User-Agent`, and teach the shared
//! [`Clock`] AWS's time from their answers' `Date` (an AssumeRole answer's expiry is in
//! STS's time, so the cache needs AWS's clock before the first Kinesis call). The SDK
//! corrects its own signing time the same way (aws-runtime's `service_clock_skew`,
//! retrying a refused call once): its clients are given no time source of ours.

use std::sync::Arc;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeDeserializationInterceptorContextRef, BeforeTransmitInterceptorContextMut,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::api::USER_AGENT;
use crate::clock::Clock;

/// The interceptor added to every SDK client the worker builds.
#[derive(Debug, Clone)]
pub struct SdkCalls {
    clock: Arc<Clock>,
}

impl SdkCalls {
    pub fn new(clock: Arc<Clock>) -> Self {
        SdkCalls { clock }
    }
}

impl Intercept for SdkCalls {
    fn name(&self) -> &'static str {
        "kinesis-destination"
    }

    fn modify_before_transmit(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // After signing: SigV4 leaves `User-Agent` out of the signature.
        let headers = context.request_mut().headers_mut();
        let agent = match headers.get("user-agent") {
            Some(sdk) => format!("{sdk} {USER_AGENT}"),
            None => USER_AGENT.to_owned(),
        };
        headers.insert("user-agent", agent);
        Ok(())
    }

    fn read_before_deserialization(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let date = context.response().headers().get("date");
        self.clock.observe(date.map(str::as_bytes), false);
        Ok(())
    }
}
