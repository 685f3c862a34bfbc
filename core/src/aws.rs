//! The one way blockfleet sets up an AWS SDK client (S3 store, KMS): rustls on ring (no aws-lc
//! build), the region, an optional endpoint for S3- or KMS-compatible services, credentials from
//! config or else the usual AWS chain, retries and timeouts.

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_smithy_http_client::tls;

use crate::config::Secret;

/// Where and how to reach an AWS-API service.
#[derive(Debug)]
pub struct Endpoint<'a> {
    pub url: Option<&'a str>,
    pub region: &'a str,
    /// Both from config, or `None` for the default credential chain.
    pub credentials: Option<(&'a str, &'a Secret)>,
    /// Whether `None` credentials may come from the AWS environment (variables, profile,
    /// instance role); if not, every call fails naming `what`.
    pub environment: Result<(), &'static str>,
    pub max_attempts: u32,
    pub timeouts: TimeoutConfig,
    /// The fleet role an `https://` endpoint may be (its certificate from the fleet CA, named
    /// for the role), beside any server the system's roots vouch for for its URL.
    pub fleet_role: Option<crate::tls::Role>,
}

/// Credentials that never load: the config named none and did not allow the environment's.
#[derive(Debug)]
struct NoCredentials(&'static str);

impl aws_credential_types::provider::ProvideCredentials for NoCredentials {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        aws_credential_types::provider::future::ProvideCredentials::ready(Err(
            aws_credential_types::provider::error::CredentialsError::not_loaded(self.0),
        ))
    }
}

pub async fn sdk_config(e: Endpoint<'_>) -> SdkConfig {
    let mut builder = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(
        tls::rustls_provider::CryptoMode::Ring,
    ));
    if let (Some(role), Some(ca)) = (e.fleet_role, crate::tls::fleet_ca()) {
        let name =
            tls::ServerName::try_from(role.dns_name().as_str()).expect("role names are DNS names");
        let context = tls::TlsContext::builder()
            .with_trust_store(tls::TrustStore::default().with_pem_certificate(ca))
            .with_additional_server_names(vec![name])
            .build()
            .expect("a TLS context of roots and names builds");
        builder = builder.tls_context(context);
    }
    let http_client = builder.build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http_client)
        .region(Region::new(e.region.to_owned()))
        .retry_config(RetryConfig::standard().with_max_attempts(e.max_attempts))
        .timeout_config(e.timeouts);
    if let Some(url) = e.url {
        loader = loader.endpoint_url(url);
    }
    match (e.credentials, e.environment) {
        (Some((id, secret)), _) => {
            loader = loader.credentials_provider(Credentials::new(
                id,
                secret.expose(),
                None,
                None,
                "blockfleet-config",
            ));
        }
        (None, Ok(())) => {}
        (None, Err(what)) => loader = loader.credentials_provider(NoCredentials(what)),
    }
    loader.load().await
}
