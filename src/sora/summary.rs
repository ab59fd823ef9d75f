//! A report's connection summary ([`ReportSummary`]), taken from its objects by the rules in
//! `docs/summary.md`. Only the members a rule reads are decoded, in one walk per object.

use std::borrow::Cow;

use kohaku_sink::{ReportSummary, StatsObject, SummaryNumber as N, SummaryText as T};

use super::object::{members, number_value, string_value};

/// The members of one object that the rules read, by name.
struct Fields<'a> {
    pairs: Vec<(Cow<'a, str>, &'a str)>,
}

impl<'a> Fields<'a> {
    fn of(object: &'a StatsObject) -> Self {
        Self {
            pairs: members(object.rtc_data.get()).collect(),
        }
    }

    fn raw(&self, name: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| *value)
    }

    fn number(&self, name: &str) -> Option<f64> {
        self.raw(name)
            .and_then(|value| number_value(value).ok().flatten())
    }

    fn text(&self, name: &str) -> Option<Cow<'a, str>> {
        self.raw(name)
            .and_then(|value| string_value(value).ok().flatten())
    }
}

/// How bad a `qualityLimitationReason` is: the report keeps its worst stream's.
fn limitation_rank(reason: &str) -> u8 {
    match reason {
        "bandwidth" => 3,
        "cpu" => 2,
        "other" => 1,
        _ => 0,
    }
}

/// The summary of a report's objects, or `None` when it has none.
pub(crate) fn summarize(objects: &[StatsObject]) -> Option<ReportSummary> {
    let time = objects
        .iter()
        .map(|object| object.rtc_timestamp)
        .reduce(f64::max)?;
    let mut summary = ReportSummary::new(time);
    summary.set_number(N::StatsObjects, Some(objects.len() as f64));
    summary.set_number(N::StatsObjectsUnchanged, Some(0.0));
    summary.set_number(N::InboundStreams, Some(0.0));
    summary.set_number(N::OutboundStreams, Some(0.0));

    let mut selected_pair: Option<String> = None;
    let mut nominated_pair: Option<String> = None;
    let mut limitation: Option<String> = None;
    // (kind, codecId) of the first outbound and inbound stream of each kind.
    let mut codec_ids: [Option<String>; 2] = [None, None];
    let mut inbound_codec_ids: [Option<String>; 2] = [None, None];
    let mut encoder: Option<(bool, String)> = None;
    let mut decoder: Option<(bool, String)> = None;

    for object in objects {
        match object.rtc_type.as_str() {
            "inbound-rtp" => {
                let fields = Fields::of(object);
                summary.add(N::InboundStreams, Some(1.0));
                for (which, name) in [
                    (N::BytesReceived, "bytesReceived"),
                    (N::PacketsReceived, "packetsReceived"),
                    (N::PacketsLost, "packetsLost"),
                    (N::JitterBufferDelay, "jitterBufferDelay"),
                    (N::JitterBufferEmittedCount, "jitterBufferEmittedCount"),
                    (N::FramesDecoded, "framesDecoded"),
                    (N::FramesDropped, "framesDropped"),
                    (N::FreezeCount, "freezeCount"),
                    (N::TotalFreezesDuration, "totalFreezesDuration"),
                    (N::ConcealedSamples, "concealedSamples"),
                    (N::TotalSamplesReceived, "totalSamplesReceived"),
                    (N::NacksSent, "nackCount"),
                ] {
                    summary.add(which, fields.number(name));
                }
                summary.max(N::Jitter, fields.number("jitter"));
                let video = fields.text("kind").as_deref() == Some("video");
                if video {
                    summary.max(N::FrameWidthReceived, fields.number("frameWidth"));
                    summary.max(N::FrameHeightReceived, fields.number("frameHeight"));
                    summary.max(N::FramesPerSecondReceived, fields.number("framesPerSecond"));
                }
                remember_first(&mut inbound_codec_ids[usize::from(video)], &fields);
                prefer_video(&mut decoder, video, fields.text("decoderImplementation"));
            }
            "outbound-rtp" => {
                let fields = Fields::of(object);
                summary.add(N::OutboundStreams, Some(1.0));
                for (which, name) in [
                    (N::BytesSent, "bytesSent"),
                    (N::PacketsSent, "packetsSent"),
                    (N::RetransmittedBytesSent, "retransmittedBytesSent"),
                    (N::FramesEncoded, "framesEncoded"),
                    (N::NacksReceived, "nackCount"),
                ] {
                    summary.add(which, fields.number(name));
                }
                let video = fields.text("kind").as_deref() == Some("video");
                if video {
                    summary.max(N::FrameWidthSent, fields.number("frameWidth"));
                    summary.max(N::FrameHeightSent, fields.number("frameHeight"));
                    summary.max(N::FramesPerSecondSent, fields.number("framesPerSecond"));
                }
                if let Some(reason) = fields.text("qualityLimitationReason") {
                    let worse = limitation
                        .as_deref()
                        .is_none_or(|current| limitation_rank(&reason) > limitation_rank(current));
                    if worse {
                        limitation = Some(reason.into_owned());
                    }
                }
                remember_first(&mut codec_ids[usize::from(video)], &fields);
                prefer_video(&mut encoder, video, fields.text("encoderImplementation"));
            }
            "remote-inbound-rtp" => {
                let fields = Fields::of(object);
                summary.max(N::RoundTripTime, fields.number("roundTripTime"));
                summary.max(N::FractionLost, fields.number("fractionLost"));
            }
            "transport" if selected_pair.is_none() => {
                selected_pair = Fields::of(object)
                    .text("selectedCandidatePairId")
                    .map(Cow::into_owned);
            }
            "candidate-pair" if nominated_pair.is_none() => {
                let fields = Fields::of(object);
                let nominated = fields.raw("nominated") == Some("true");
                if nominated && fields.text("state").as_deref() == Some("succeeded") {
                    nominated_pair = Some(object.rtc_id.clone());
                }
            }
            _ => {}
        }
    }

    summary.set_text(T::QualityLimitationReason, limitation);
    summary.set_text(T::EncoderImplementation, encoder.map(|(_, name)| name));
    summary.set_text(T::DecoderImplementation, decoder.map(|(_, name)| name));

    // The pair the transport names; without a transport, the nominated pair that succeeded.
    if let Some(pair) = selected_pair
        .or(nominated_pair)
        .and_then(|id| find(objects, "candidate-pair", &id))
    {
        let pair = Fields::of(pair);
        summary.set_number(N::CurrentRoundTripTime, pair.number("currentRoundTripTime"));
        summary.set_number(
            N::AvailableOutgoingBitrate,
            pair.number("availableOutgoingBitrate"),
        );
        if let Some(local) = pair
            .text("localCandidateId")
            .and_then(|id| find(objects, "local-candidate", &id))
        {
            let local = Fields::of(local);
            summary.set_text(T::LocalCandidateType, owned(local.text("candidateType")));
            summary.set_text(T::RelayProtocol, owned(local.text("relayProtocol")));
        }
        if let Some(remote) = pair
            .text("remoteCandidateId")
            .and_then(|id| find(objects, "remote-candidate", &id))
        {
            let remote = Fields::of(remote);
            summary.set_text(T::RemoteCandidateType, owned(remote.text("candidateType")));
        }
    }

    // What is sent names the codec; a receive-only connection's is what it receives.
    for (which, index) in [(T::AudioCodec, 0), (T::VideoCodec, 1)] {
        let codec = codec_ids[index]
            .as_deref()
            .or(inbound_codec_ids[index].as_deref())
            .and_then(|id| find(objects, "codec", id))
            .and_then(|codec| owned(Fields::of(codec).text("mimeType")));
        summary.set_text(which, codec);
    }
    Some(summary)
}

fn owned(text: Option<Cow<'_, str>>) -> Option<String> {
    text.map(Cow::into_owned)
}

fn find<'a>(objects: &'a [StatsObject], rtc_type: &str, id: &str) -> Option<&'a StatsObject> {
    objects
        .iter()
        .find(|object| object.rtc_type == rtc_type && object.rtc_id == id)
}

fn remember_first(slot: &mut Option<String>, fields: &Fields<'_>) {
    if slot.is_none() {
        *slot = owned(fields.text("codecId"));
    }
}

/// Keeps the first implementation named, a video stream's over an audio one's: the video codec's
/// implementation is the one that tells hardware from software.
fn prefer_video(slot: &mut Option<(bool, String)>, video: bool, name: Option<Cow<'_, str>>) {
    let Some(name) = name else { return };
    let better = match slot {
        None => true,
        Some((was_video, _)) => video && !*was_video,
    };
    if better {
        *slot = Some((video, name.into_owned()));
    }
}
