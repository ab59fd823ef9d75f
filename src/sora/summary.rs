//! A report's connection summary ([`ReportSummary`]), taken from its objects by the rules in
//! `docs/summary.md`. Only the members a rule reads are decoded, in one walk per object.

use std::borrow::Cow;

use kohaku_sink::{ReportSummary, StatsObject, SummaryNumber as N, SummaryText as T};

use super::object::{members, number_value, string_value};

/// The members named in `names` of one object, in one walk over its members without allocating:
/// each value's text (still JSON), or `None` when the object has no such member.
fn read<'a, const N: usize>(object: &'a StatsObject, names: &[&str; N]) -> [Option<&'a str>; N] {
    read_summed(object, &[], names).1
}

/// [`read`] for a stream: the members `summed` names (each with the figure it adds to), then
/// those `others` names, in the same one walk.
fn read_summed<'a, const S: usize, const O: usize>(
    object: &'a StatsObject,
    summed: &[(N, &str); S],
    others: &[&str; O],
) -> ([Option<&'a str>; S], [Option<&'a str>; O]) {
    let mut sums = [None; S];
    let mut rest = [None; O];
    for (name, value) in members(object.rtc_data.get()) {
        if let Some(slot) = summed.iter().position(|(_, wanted)| *wanted == name) {
            sums[slot] = Some(value);
        } else if let Some(slot) = others.iter().position(|wanted| *wanted == name) {
            rest[slot] = Some(value);
        }
    }
    (sums, rest)
}

fn number(value: Option<&str>) -> Option<f64> {
    value.and_then(|value| number_value(value).ok().flatten())
}

fn text(value: Option<&str>) -> Option<Cow<'_, str>> {
    value.and_then(|value| string_value(value).ok().flatten())
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
pub(crate) fn summarize(objects: &[&StatsObject]) -> Option<ReportSummary> {
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
    // The `codecId` of the first outbound and of the first inbound stream of each kind (0 audio,
    // 1 video).
    let mut codec_ids: [Option<String>; 2] = [None, None];
    let mut inbound_codec_ids: [Option<String>; 2] = [None, None];
    let mut encoder_name: Option<(bool, String)> = None;
    let mut decoder_name: Option<(bool, String)> = None;

    for &object in objects {
        match object.rtc_type.as_str() {
            "inbound-rtp" => {
                const SUMMED: [(N, &str); 12] = [
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
                ];
                let (summed, [jitter, kind, width, height, fps, codec, decoder]) = read_summed(
                    object,
                    &SUMMED,
                    &[
                        "jitter",
                        "kind",
                        "frameWidth",
                        "frameHeight",
                        "framesPerSecond",
                        "codecId",
                        "decoderImplementation",
                    ],
                );
                summary.add(N::InboundStreams, Some(1.0));
                for ((which, _), value) in SUMMED.iter().zip(summed) {
                    summary.add(*which, number(value));
                }
                summary.max(N::Jitter, number(jitter));
                let video = text(kind).as_deref() == Some("video");
                if video {
                    summary.max(N::FrameWidthReceived, number(width));
                    summary.max(N::FrameHeightReceived, number(height));
                    summary.max(N::FramesPerSecondReceived, number(fps));
                }
                remember_first(&mut inbound_codec_ids[usize::from(video)], text(codec));
                prefer_video(&mut decoder_name, video, text(decoder));
            }
            "outbound-rtp" => {
                const SUMMED: [(N, &str); 5] = [
                    (N::BytesSent, "bytesSent"),
                    (N::PacketsSent, "packetsSent"),
                    (N::RetransmittedBytesSent, "retransmittedBytesSent"),
                    (N::FramesEncoded, "framesEncoded"),
                    (N::NacksReceived, "nackCount"),
                ];
                let (summed, [kind, width, height, fps, reason, codec, encoder]) = read_summed(
                    object,
                    &SUMMED,
                    &[
                        "kind",
                        "frameWidth",
                        "frameHeight",
                        "framesPerSecond",
                        "qualityLimitationReason",
                        "codecId",
                        "encoderImplementation",
                    ],
                );
                summary.add(N::OutboundStreams, Some(1.0));
                for ((which, _), value) in SUMMED.iter().zip(summed) {
                    summary.add(*which, number(value));
                }
                let video = text(kind).as_deref() == Some("video");
                if video {
                    summary.max(N::FrameWidthSent, number(width));
                    summary.max(N::FrameHeightSent, number(height));
                    summary.max(N::FramesPerSecondSent, number(fps));
                }
                if let Some(reason) = text(reason) {
                    let worse = limitation
                        .as_deref()
                        .is_none_or(|current| limitation_rank(&reason) > limitation_rank(current));
                    if worse {
                        limitation = Some(reason.into_owned());
                    }
                }
                remember_first(&mut codec_ids[usize::from(video)], text(codec));
                prefer_video(&mut encoder_name, video, text(encoder));
            }
            "remote-inbound-rtp" => {
                let [rtt, lost] = read(object, &["roundTripTime", "fractionLost"]);
                summary.max(N::RoundTripTime, number(rtt));
                summary.max(N::FractionLost, number(lost));
            }
            "transport" if selected_pair.is_none() => {
                let [pair] = read(object, &["selectedCandidatePairId"]);
                selected_pair = owned(text(pair));
            }
            "candidate-pair" if nominated_pair.is_none() => {
                let [nominated, state] = read(object, &["nominated", "state"]);
                if nominated == Some("true") && text(state).as_deref() == Some("succeeded") {
                    nominated_pair = Some(object.rtc_id.clone());
                }
            }
            _ => {}
        }
    }

    summary.set_text(T::QualityLimitationReason, limitation);
    summary.set_text(T::EncoderImplementation, encoder_name.map(|(_, name)| name));
    summary.set_text(T::DecoderImplementation, decoder_name.map(|(_, name)| name));

    // The pair the transport names; without a transport, the nominated pair that succeeded.
    if let Some(pair) = selected_pair
        .or(nominated_pair)
        .and_then(|id| find(objects, "candidate-pair", &id))
    {
        let [rtt, bitrate, local_id, remote_id] = read(
            pair,
            &[
                "currentRoundTripTime",
                "availableOutgoingBitrate",
                "localCandidateId",
                "remoteCandidateId",
            ],
        );
        summary.set_number(N::CurrentRoundTripTime, number(rtt));
        summary.set_number(N::AvailableOutgoingBitrate, number(bitrate));
        if let Some(local) = text(local_id).and_then(|id| find(objects, "local-candidate", &id)) {
            let [kind, relay] = read(local, &["candidateType", "relayProtocol"]);
            summary.set_text(T::LocalCandidateType, owned(text(kind)));
            summary.set_text(T::RelayProtocol, owned(text(relay)));
        }
        if let Some(remote) = text(remote_id).and_then(|id| find(objects, "remote-candidate", &id))
        {
            let [kind] = read(remote, &["candidateType"]);
            summary.set_text(T::RemoteCandidateType, owned(text(kind)));
        }
    }

    // What is sent names the codec; a receive-only connection's is what it receives.
    for (which, index) in [(T::AudioCodec, 0), (T::VideoCodec, 1)] {
        let codec = codec_ids[index]
            .as_deref()
            .or(inbound_codec_ids[index].as_deref())
            .and_then(|id| find(objects, "codec", id))
            .and_then(|codec| owned(text(read(codec, &["mimeType"])[0])));
        summary.set_text(which, codec);
    }
    Some(summary)
}

fn owned(text: Option<Cow<'_, str>>) -> Option<String> {
    text.map(Cow::into_owned)
}

fn find<'a>(objects: &[&'a StatsObject], rtc_type: &str, id: &str) -> Option<&'a StatsObject> {
    objects
        .iter()
        .copied()
        .find(|object| object.rtc_type == rtc_type && object.rtc_id == id)
}

fn remember_first(slot: &mut Option<String>, codec_id: Option<Cow<'_, str>>) {
    if slot.is_none() {
        *slot = owned(codec_id);
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
