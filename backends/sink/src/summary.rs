//! The per-report connection summary: one row per report with the few dozen figures the overview
//! dashboard and a quality score need, so that they never read the raw stats objects.
//!
//! The columns are declared once here ([`SummaryNumber`], [`SummaryText`]); each backend builds its
//! statements from [`SummaryNumber::ALL`] and [`SummaryText::ALL`], and a test per backend checks
//! that its table has exactly these columns. How each figure is taken from a report's objects is
//! documented in `docs/summary.md` and done by Kohaku's sink workers (`src/sora/summary.rs`,
//! through [`crate::Report::summarize_with`]).

macro_rules! columns {
    ($(#[$meta:meta])* $name:ident { $($(#[$doc:meta])* $variant:ident = $column:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($(#[$doc])* $variant,)*
        }

        impl $name {
            /// Every column, in the order of the table's columns.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The column's name in every backend.
            pub const fn column(self) -> &'static str {
                match self {
                    $($name::$variant => $column,)*
                }
            }
        }
    };
}

columns! {
    /// A numeric figure of the summary (double precision; NULL when no object carried it).
    SummaryNumber {
        /// How many stats objects the report carried (before `skip_unchanged`).
        StatsObjects = "stats_objects",
        /// How many of them `skip_unchanged` found unchanged and did not store.
        StatsObjectsUnchanged = "stats_objects_unchanged",
        InboundStreams = "inbound_streams",
        BytesReceived = "bytes_received",
        PacketsReceived = "packets_received",
        PacketsLost = "packets_lost",
        /// Seconds; the largest of the inbound streams'.
        Jitter = "jitter",
        JitterBufferDelay = "jitter_buffer_delay",
        JitterBufferEmittedCount = "jitter_buffer_emitted_count",
        FramesDecoded = "frames_decoded",
        FramesDropped = "frames_dropped",
        FreezeCount = "freeze_count",
        TotalFreezesDuration = "total_freezes_duration",
        ConcealedSamples = "concealed_samples",
        TotalSamplesReceived = "total_samples_received",
        NacksSent = "nacks_sent",
        FrameWidthReceived = "frame_width_received",
        FrameHeightReceived = "frame_height_received",
        FramesPerSecondReceived = "frames_per_second_received",
        OutboundStreams = "outbound_streams",
        BytesSent = "bytes_sent",
        PacketsSent = "packets_sent",
        RetransmittedBytesSent = "retransmitted_bytes_sent",
        FramesEncoded = "frames_encoded",
        NacksReceived = "nacks_received",
        FrameWidthSent = "frame_width_sent",
        FrameHeightSent = "frame_height_sent",
        FramesPerSecondSent = "frames_per_second_sent",
        /// Seconds; the largest of the remote-inbound-rtp objects'.
        RoundTripTime = "round_trip_time",
        /// 0..1; the largest of the remote-inbound-rtp objects'.
        FractionLost = "fraction_lost",
        /// Seconds, of the selected candidate pair.
        CurrentRoundTripTime = "current_round_trip_time",
        /// Bits per second, of the selected candidate pair.
        AvailableOutgoingBitrate = "available_outgoing_bitrate",
    }
}

columns! {
    /// A text figure of the summary (NULL when no object carried it).
    SummaryText {
        QualityLimitationReason = "quality_limitation_reason",
        EncoderImplementation = "encoder_implementation",
        DecoderImplementation = "decoder_implementation",
        LocalCandidateType = "local_candidate_type",
        RemoteCandidateType = "remote_candidate_type",
        RelayProtocol = "relay_protocol",
        AudioCodec = "audio_codec",
        VideoCodec = "video_codec",
    }
}

/// One report's summary. Keyed like a stats object by `(connection_id, rtc_timestamp)`, so a
/// report delivered twice stores one summary.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportSummary {
    /// The largest `timestamp` of the report's objects (ms since the epoch).
    pub rtc_timestamp: f64,
    numbers: [Option<f64>; SummaryNumber::ALL.len()],
    texts: [Option<String>; SummaryText::ALL.len()],
}

impl ReportSummary {
    pub fn new(rtc_timestamp: f64) -> Self {
        Self {
            rtc_timestamp,
            numbers: [None; SummaryNumber::ALL.len()],
            texts: Default::default(),
        }
    }

    pub fn number(&self, which: SummaryNumber) -> Option<f64> {
        self.numbers[which as usize]
    }

    pub fn text(&self, which: SummaryText) -> Option<&str> {
        self.texts[which as usize].as_deref()
    }

    pub fn set_number(&mut self, which: SummaryNumber, value: Option<f64>) {
        self.numbers[which as usize] = value;
    }

    /// Adds `value` to a summed figure; a figure no object carried stays NULL.
    pub fn add(&mut self, which: SummaryNumber, value: Option<f64>) {
        if let Some(value) = value {
            let slot = &mut self.numbers[which as usize];
            *slot = Some(slot.unwrap_or(0.0) + value);
        }
    }

    /// Keeps the larger of the figure and `value`.
    pub fn max(&mut self, which: SummaryNumber, value: Option<f64>) {
        if let Some(value) = value {
            let slot = &mut self.numbers[which as usize];
            *slot = Some(slot.map_or(value, |current| current.max(value)));
        }
    }

    pub fn set_text(&mut self, which: SummaryText, value: Option<String>) {
        self.texts[which as usize] = value;
    }

    /// Every numeric figure with its column, in [`SummaryNumber::ALL`] order.
    pub fn numbers(&self) -> impl Iterator<Item = (SummaryNumber, Option<f64>)> + '_ {
        SummaryNumber::ALL
            .iter()
            .map(|which| (*which, self.number(*which)))
    }

    /// Every text figure with its column, in [`SummaryText::ALL`] order.
    pub fn texts(&self) -> impl Iterator<Item = (SummaryText, Option<&str>)> + '_ {
        SummaryText::ALL
            .iter()
            .map(|which| (*which, self.text(*which)))
    }
}

/// The summary table's columns after its key and connection columns, numbers first, as every
/// backend declares them.
pub fn summary_columns() -> impl Iterator<Item = &'static str> {
    SummaryNumber::ALL
        .iter()
        .map(|which| which.column())
        .chain(SummaryText::ALL.iter().map(|which| which.column()))
}
