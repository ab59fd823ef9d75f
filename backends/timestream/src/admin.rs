//! Making the client (the AWS chain or a fixed endpoint) and the database and table `migrate`
//! creates and keeps at the configured retention.

use aws_sdk_timestreamwrite::config::timeout::TimeoutConfig;
use aws_sdk_timestreamwrite::config::{BehaviorVersion, Region};
use aws_sdk_timestreamwrite::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_timestreamwrite::types::{MagneticStoreWriteProperties, RetentionProperties};
use aws_sdk_timestreamwrite::Client;
use kohaku_sink::SinkError;

use crate::{EndpointMode, TimestreamSink};

impl TimestreamSink {
    pub(crate) async fn make_client(&self) -> Result<Client, SinkError> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.options.connect_timeout)
            .operation_attempt_timeout(self.options.request_timeout())
            .build();
        let sdk_config = match &self.base_config {
            Some(config) => config.clone(),
            None => {
                let mut loader = aws_config::defaults(BehaviorVersion::latest());
                if let Some(region) = &self.options.region {
                    loader = loader.region(Region::new(region.clone()));
                }
                loader.load().await
            }
        };
        let mut builder =
            aws_sdk_timestreamwrite::config::Builder::from(&sdk_config).timeout_config(timeouts);
        if let Some(region) = &self.options.region {
            builder = builder.region(Region::new(region.clone()));
        } else if sdk_config.region().is_none() {
            return Err(SinkError::classified(
                false,
                "no AWS region: set region in [sinks.timestream] or AWS_REGION",
            ));
        }
        match self.options.endpoint_mode() {
            EndpointMode::Fixed(url) => {
                tracing::info!(endpoint = %url, "timestream endpoint fixed; endpoint discovery off");
                Ok(Client::from_conf(builder.endpoint_url(url).build()))
            }
            EndpointMode::Discovery => {
                let (client, reloader) = Client::from_conf(builder.build())
                    .with_endpoint_discovery_enabled()
                    .await
                    .map_err(|err| {
                        SinkError::transient("timestream endpoint discovery failed", err)
                    })?;
                let task = tokio::spawn(reloader.reload_task());
                if let Ok(mut slot) = self.discovery_task.lock() {
                    *slot = Some(task);
                }
                Ok(client)
            }
        }
    }

    /// `database.table`, for messages.
    pub(crate) fn table_path(&self) -> String {
        format!("{}.{}", self.options.database, self.options.table)
    }

    pub(crate) async fn ensure_database(&self, client: &Client) -> Result<(), SinkError> {
        let database = &self.options.database;
        let found = client
            .describe_database()
            .database_name(database)
            .send()
            .await;
        match found {
            Ok(_) => Ok(()),
            Err(err) if is_not_found(&err) => {
                if !self.options.create_if_missing {
                    return Err(missing(format!("Timestream database {database:?}")));
                }
                match client
                    .create_database()
                    .database_name(database)
                    .send()
                    .await
                {
                    Ok(_) => {
                        tracing::info!(database = %database, "timestream database created");
                        Ok(())
                    }
                    // Another Kohaku created it meanwhile.
                    Err(err) if err.code() == Some("ConflictException") => Ok(()),
                    Err(err) => Err(admin_error(
                        format!("cannot create Timestream database {database:?}"),
                        err,
                    )),
                }
            }
            Err(err) => Err(admin_error(
                format!("cannot describe Timestream database {database:?}"),
                err,
            )),
        }
    }

    pub(crate) fn retention(&self) -> Result<RetentionProperties, SinkError> {
        RetentionProperties::builder()
            .memory_store_retention_period_in_hours(i64::from(
                self.options.memory_store_retention_hours,
            ))
            .magnetic_store_retention_period_in_days(i64::from(
                self.options.magnetic_store_retention_days,
            ))
            .build()
            .map_err(|err| SinkError::permanent("retention settings", err))
    }

    pub(crate) async fn ensure_table(&self, client: &Client) -> Result<(), SinkError> {
        let path = self.table_path();
        let found = client
            .describe_table()
            .database_name(&self.options.database)
            .table_name(&self.options.table)
            .send()
            .await;
        match found {
            Ok(described) => {
                if !self.options.create_if_missing {
                    return Ok(());
                }
                let wanted = self.retention()?;
                let current = described.table().and_then(|t| t.retention_properties());
                if current != Some(&wanted) {
                    client
                        .update_table()
                        .database_name(&self.options.database)
                        .table_name(&self.options.table)
                        .retention_properties(wanted)
                        .send()
                        .await
                        .map_err(|err| {
                            admin_error(format!("cannot update the retention of {path}"), err)
                        })?;
                    tracing::info!(table = %path, "timestream table retention updated");
                }
                Ok(())
            }
            Err(err) if is_not_found(&err) => {
                if !self.options.create_if_missing {
                    return Err(missing(format!("Timestream table {path}")));
                }
                // Late reports (a restarted Kohaku replaying its spool, `kohaku import` of an
                // old log) are older than the memory store keeps: they go to the magnetic store.
                let magnetic = MagneticStoreWriteProperties::builder()
                    .enable_magnetic_store_writes(true)
                    .build()
                    .map_err(|err| SinkError::permanent("magnetic store settings", err))?;
                let created = client
                    .create_table()
                    .database_name(&self.options.database)
                    .table_name(&self.options.table)
                    .retention_properties(self.retention()?)
                    .magnetic_store_write_properties(magnetic)
                    .send()
                    .await;
                match created {
                    Ok(_) => {
                        tracing::info!(table = %path, "timestream table created");
                        Ok(())
                    }
                    Err(err) if err.code() == Some("ConflictException") => Ok(()),
                    Err(err) => Err(admin_error(format!("cannot create table {path}"), err)),
                }
            }
            Err(err) => Err(admin_error(format!("cannot describe table {path}"), err)),
        }
    }
}

pub(crate) fn is_not_found<E: ProvideErrorMetadata>(err: &SdkError<E>) -> bool {
    err.code() == Some("ResourceNotFoundException")
}

/// Errors of describe/create/update calls: unreachable or throttled is worth a retry, anything
/// Timestream answered otherwise is not.
pub(crate) fn admin_error<E>(context: String, err: SdkError<E>) -> SinkError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transient = match &err {
        SdkError::ServiceError(_) => {
            matches!(
                err.code(),
                Some("ThrottlingException" | "InternalServerException")
            ) || err
                .raw_response()
                .is_some_and(|response| response.status().is_server_error())
        }
        SdkError::ConstructionFailure(_) => false,
        _ => true,
    };
    SinkError::classified(
        transient,
        format!("{context}: {}", DisplayErrorContext(&err)),
    )
}

/// The database or table is not there and Kohaku was not asked to create it.
pub(crate) fn missing(what: String) -> SinkError {
    SinkError::classified(
        false,
        format!("{what} does not exist; create it, or set create_if_missing = true in [sinks.timestream]"),
    )
}
