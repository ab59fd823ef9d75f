//! The connection's fields every form carries, and their rules (`docs/protocol.md`, "What every
//! form must hold").

use std::borrow::Cow;

use kohaku_sink::{Connection, OffsetDateTime};
use time::format_description::well_known::Rfc3339;

use super::InvalidReport;

const SORA_ID_LEN: usize = 26;
/// Years a report's send time may fall in: what PostgreSQL's `timestamptz`, SQLite's text times
/// and Timestream all hold. A time outside would be acknowledged and then fail its batch.
const SORA_YEARS: std::ops::RangeInclusive<i32> = 1970..=9999;
const MAX_NAME_BYTES: usize = 255;
const ROLES: [&str; 3] = ["sendrecv", "sendonly", "recvonly"];

/// The connection metadata every exporter and webhook body and every log line carries.
pub(super) struct ConnectionFields<'a> {
    pub(super) timestamp: Option<Cow<'a, str>>,
    pub(super) label: Option<Cow<'a, str>>,
    pub(super) version: Option<Cow<'a, str>>,
    pub(super) node_name: Option<Cow<'a, str>>,
    pub(super) multistream: Option<bool>,
    pub(super) simulcast: Option<bool>,
    pub(super) spotlight: Option<bool>,
    pub(super) role: Option<Cow<'a, str>>,
    pub(super) channel_id: Option<Cow<'a, str>>,
    pub(super) session_id: Option<Cow<'a, str>>,
    pub(super) client_id: Option<Cow<'a, str>>,
    pub(super) connection_id: Option<Cow<'a, str>>,
    pub(super) bundle_id: Option<Cow<'a, str>>,
    pub(super) group_id: Option<Cow<'a, str>>,
}

impl ConnectionFields<'_> {
    /// The connection and Sora's send time, or the first field that is missing or wrong.
    pub(super) fn validate(self) -> Result<(Connection, OffsetDateTime), InvalidReport> {
        let timestamp = required(self.timestamp, "timestamp")?;
        let sora_timestamp = OffsetDateTime::parse(&timestamp, &Rfc3339)
            .map_err(|err| {
                InvalidReport::new(
                    "timestamp",
                    format!("`{timestamp}` is not an RFC 3339 time such as 2025-07-25T06:06:51.592776Z: {err}"),
                )
            })?
            .checked_to_offset(time::UtcOffset::UTC)
            .filter(|at| SORA_YEARS.contains(&at.year()))
            .ok_or_else(|| {
                InvalidReport::new(
                    "timestamp",
                    format!(
                        "`{timestamp}` is outside the years {} to {} (UTC) that every store keeps",
                        SORA_YEARS.start(),
                        SORA_YEARS.end()
                    ),
                )
            })?;
        for (field, value) in [
            ("channel_id", self.channel_id.as_deref()),
            ("client_id", self.client_id.as_deref()),
            ("bundle_id", self.bundle_id.as_deref()),
            ("group_id", self.group_id.as_deref()),
            ("label", self.label.as_deref()),
            ("version", self.version.as_deref()),
            ("node_name", self.node_name.as_deref()),
        ] {
            if value.is_some_and(|value| value.contains('\0')) {
                return Err(InvalidReport::new(
                    field,
                    "contains a NUL character, which PostgreSQL text cannot store",
                ));
            }
        }

        let role = required(self.role, "role")?;
        if !ROLES.contains(&role.as_ref()) {
            return Err(InvalidReport::new(
                "role",
                format!("unexpected role `{role}`; expected one of sendrecv, sendonly, recvonly"),
            ));
        }
        let connection = Connection {
            channel_id: name(self.channel_id, "channel_id")?,
            session_id: sora_id(self.session_id, "session_id")?,
            client_id: name(self.client_id, "client_id")?,
            connection_id: sora_id(self.connection_id, "connection_id")?,
            bundle_id: self.bundle_id.map(Cow::into_owned),
            group_id: self.group_id.map(Cow::into_owned),
            label: required(self.label, "label")?.into_owned(),
            version: required(self.version, "version")?.into_owned(),
            node_name: required(self.node_name, "node_name")?.into_owned(),
            role: role.into_owned(),
            multistream: self.multistream,
            simulcast: required(self.simulcast, "simulcast")?,
            spotlight: required(self.spotlight, "spotlight")?,
        };
        Ok((connection, sora_timestamp))
    }
}

pub(super) fn required<T>(value: Option<T>, field: &str) -> Result<T, InvalidReport> {
    value.ok_or_else(|| InvalidReport::new(field, format!("missing required field `{field}`")))
}

fn name(value: Option<Cow<'_, str>>, field: &str) -> Result<String, InvalidReport> {
    let value = required(value, field)?;
    if value.is_empty() || value.len() > MAX_NAME_BYTES {
        return Err(InvalidReport::new(
            field,
            format!(
                "must be 1 to {MAX_NAME_BYTES} bytes long, got {}",
                value.len()
            ),
        ));
    }
    Ok(value.into_owned())
}

fn sora_id(value: Option<Cow<'_, str>>, field: &str) -> Result<String, InvalidReport> {
    let value = required(value, field)?;
    if value.len() != SORA_ID_LEN || !value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(InvalidReport::new(
            field,
            format!(
                "`{value}` is not a Sora id: expected {SORA_ID_LEN} characters, got {}",
                value.chars().count()
            ),
        ));
    }
    Ok(value.into_owned())
}
