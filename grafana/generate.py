#!/usr/bin/env python3
"""Writes Kohaku's Grafana dashboards for both backends from one description.

The panels are the same for PostgreSQL/TimescaleDB and SQLite; only the time expressions and the
query fields differ, so they are described once here and rendered per backend. Run it after
changing a panel (`python3 grafana/generate.py`); the JSON files it writes are what Grafana loads
and what the tests run. Rate logic lives in the schema's views (rtc_*_rates), never here; the overview reads the per-report
summaries (rtc_report_summary), never the raw objects.
"""

import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent

BACKENDS = {
    "timescaledb": {
        "title": "PostgreSQL",
        "datasource": {"type": "grafana-postgresql-datasource", "uid": "kohaku-postgres"},
        # The object's own time as a timestamptz, and what filters it to the dashboard's range.
        "TIME": 'rtc_time AS "time"',
        "T": "rtc_time",
        "RANGE": "$__timeFilter(rtc_time)",
        # Bucketed on the epoch-milliseconds double, as on SQLite: Grafana's $__timeGroupAlias
        # computes in numeric (extract(epoch …)), which cost a third of an overview time series.
        "BUCKET": 'to_timestamp(floor(rtc_timestamp / $__interval_ms) * $__interval_ms / 1000.0) AS "time"',
        "CONN_RANGE": "last_seen >= $__timeFrom() AND first_seen <= $__timeTo()",
    },
    "sqlite": {
        "title": "SQLite",
        "datasource": {"type": "frser-sqlite-datasource", "uid": "kohaku-sqlite"},
        # rtc_timestamp is epoch milliseconds; the plugin reads a `time` column in seconds.
        "TIME": "rtc_timestamp / 1000.0 AS time",
        "T": "rtc_timestamp",
        "RANGE": "rtc_timestamp BETWEEN $__from AND $__to",
        "BUCKET": "CAST(rtc_timestamp / $__interval_ms AS INTEGER) * $__interval_ms / 1000.0 AS time",
        "CONN_RANGE": "julianday(last_seen) >= julianday($__from / 1000.0, 'unixepoch') "
        "AND julianday(first_seen) <= julianday($__to / 1000.0, 'unixepoch')",
    },
}

CHANNELS = "channel_id IN (${channel_id:singlequote})"
CONNECTION = (
    "channel_id = ${channel_id:singlequote} AND connection_id = ${connection_id:singlequote} "
    "AND {RANGE}"
)
CHANNEL_QUERY = "SELECT DISTINCT channel_id FROM sora_connection WHERE {CONN_RANGE} ORDER BY 1"
SERIES = "kind || ' ' || rtc_id AS metric"
OUTBOUND_SERIES = "kind || ' ' || coalesce(rid, rtc_id) AS metric"


def uid(backend, name):
    return f"kohaku-{name}-{'pg' if backend == 'timescaledb' else 'sqlite'}"


def connection_link(backend):
    return {
        "title": "Connection details",
        "url": f"/d/{uid(backend, 'connection')}/kohaku-connection"
        "?var-channel_id=${__data.fields.channel_id}"
        "&var-connection_id=${__data.fields.connection_id}&${__url_time_range}",
    }


def target(backend, sql, table):
    spec = BACKENDS[backend]
    sql = (
        sql.replace("{CONNECTION}", CONNECTION)
        .replace("{CHANNELS}", CHANNELS)
        .replace("{SERIES}", SERIES)
        .replace("{OUTBOUND_SERIES}", OUTBOUND_SERIES)
    )
    for key in ("TIME", "T", "RANGE", "BUCKET", "CONN_RANGE"):
        sql = sql.replace("{" + key + "}", spec[key])
    if backend == "timescaledb":
        return {
            "refId": "A",
            "datasource": spec["datasource"],
            "editorMode": "code",
            "rawQuery": True,
            "format": "table" if table else "time_series",
            "rawSql": sql,
        }
    return {
        "refId": "A",
        "datasource": spec["datasource"],
        "queryType": "table" if table else "time series",
        "rawQueryText": sql,
        "queryText": sql,
        "timeColumns": ["time", "first_seen", "last_seen"],
    }


class Layout:
    """Places panels left to right, wrapping at Grafana's 24 columns."""

    def __init__(self):
        self.x = 0
        self.y = 0
        self.row_height = 0
        self.next_id = 1

    def place(self, width, height):
        if self.x + width > 24:
            self.x = 0
            self.y += self.row_height
            self.row_height = 0
        pos = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.x += width
        self.row_height = max(self.row_height, height)
        return pos

    def row(self, title):
        if self.x:
            self.y += self.row_height
        self.x, self.row_height = 0, 0
        panel = {
            "type": "row",
            "id": self.take_id(),
            "title": title,
            "collapsed": False,
            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1},
            "panels": [],
        }
        self.y += 1
        return panel

    def take_id(self):
        panel_id = self.next_id
        self.next_id += 1
        return panel_id


def panel(layout, backend, kind, title, sql, unit=None, width=12, height=8, description=None,
          links=None, minimum=None, maximum=None):
    table = kind in ("table", "stat")
    defaults = {}
    if unit:
        defaults["unit"] = unit
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    result = {
        "type": kind,
        "id": layout.take_id(),
        "title": title,
        "datasource": BACKENDS[backend]["datasource"],
        "gridPos": layout.place(width, height),
        "targets": [target(backend, sql, table)],
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {},
    }
    if description:
        result["description"] = description
    if links:
        result["fieldConfig"]["overrides"].append(
            {
                "matcher": {"id": "byName", "options": "connection_id"},
                "properties": [{"id": "links", "value": links}],
            }
        )
    if kind == "timeseries":
        result["options"] = {"legend": {"displayMode": "list", "placement": "bottom"},
                             "tooltip": {"mode": "multi"}}
        defaults["custom"] = {"spanNulls": False, "showPoints": "auto"}
    return result


def variable(backend, name, label, sql, multi=False):
    query = target(backend, sql, table=True)
    text = query.get("rawSql") or query["rawQueryText"]
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": BACKENDS[backend]["datasource"],
        "definition": text,
        "query": text,
        "refresh": 2,
        "multi": multi,
        "includeAll": multi,
        "sort": 1 if multi else 0,
        "current": {},
        "options": [],
    }


def dashboard(backend, name, title, description, panels, variables, links):
    return {
        "uid": uid(backend, name),
        "title": f"Kohaku / {title} ({BACKENDS[backend]['title']})",
        "description": description,
        "tags": ["kohaku", "webrtc", backend],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "links": links,
        "panels": panels,
    }


def overview(backend):
    layout = Layout()
    link = [connection_link(backend)]
    panels = [
        panel(layout, backend, "stat", "Channels",
              "SELECT count(DISTINCT channel_id) AS channels FROM sora_connection "
              "WHERE {CONN_RANGE} AND {CHANNELS}", width=6, height=4),
        panel(layout, backend, "stat", "Connections",
              "SELECT count(*) AS connections FROM sora_connection "
              "WHERE {CONN_RANGE} AND {CHANNELS}", width=6, height=4),
        panel(layout, backend, "stat", "Stats objects stored",
              "SELECT sum(stats_objects - stats_objects_unchanged) AS objects "
              "FROM rtc_report_summary WHERE {RANGE} AND {CHANNELS}",
              width=6, height=4),
        panel(layout, backend, "stat", "Sora nodes",
              "SELECT count(DISTINCT node_name) AS nodes FROM sora_connection "
              "WHERE {CONN_RANGE} AND {CHANNELS}", width=6, height=4),
        panel(layout, backend, "timeseries", "Ingest volume (stats objects per interval)",
              "SELECT {BUCKET}, sum(stats_objects - stats_objects_unchanged) AS stored, "
              "sum(stats_objects_unchanged) AS unchanged_not_stored, count(*) AS reports "
              "FROM rtc_report_summary WHERE {RANGE} AND {CHANNELS} GROUP BY 1 ORDER BY 1",
              unit="short", minimum=0,
              description="Objects stored, objects skip_unchanged found unchanged and did not "
              "store, and reports, per interval."),
        panel(layout, backend, "timeseries", "Connections reporting",
              "SELECT {BUCKET}, count(DISTINCT connection_id) AS connections FROM rtc_report_summary "
              "WHERE {RANGE} AND {CHANNELS} GROUP BY 1 ORDER BY 1",
              unit="short", minimum=0),
        panel(layout, backend, "table", "Connections",
              "SELECT c.channel_id, c.connection_id, c.role, c.client_id, c.group_id, c.node_name AS sora_node, "
              "c.version AS sora_version, c.simulcast, c.first_seen, c.last_seen, "
              "s.video_codec, s.audio_codec, s.encoder, s.decoder, s.local_candidate, s.remote_candidate "
              "FROM sora_connection c LEFT JOIN ("
              "SELECT connection_id, max(video_codec) AS video_codec, max(audio_codec) AS audio_codec, "
              "max(encoder_implementation) AS encoder, max(decoder_implementation) AS decoder, "
              "max(local_candidate_type) AS local_candidate, max(remote_candidate_type) AS remote_candidate "
              "FROM rtc_report_summary WHERE {RANGE} AND {CHANNELS} GROUP BY connection_id"
              ") s ON s.connection_id = c.connection_id "
              "WHERE {CONN_RANGE} AND c.{CHANNELS} "
              "ORDER BY c.last_seen DESC",
              width=24, height=10, links=link,
              description="group_id is the stats webhook's (Sora 2025.2 and later; empty for "
              "the older exporter). Codecs, encoder and decoder implementations (e.g. libvpx, "
              "ExternalEncoder: they hint at the platform) and the selected candidate types (relay "
              "means TURN) come from the reports' summaries. Click a connection for its details."),
        panel(layout, backend, "table", "Reception by connection",
              "SELECT channel_id, connection_id, avg(packet_loss_percent) AS loss_percent, "
              "max(packet_loss_percent) AS max_loss_percent, avg(jitter_ms) AS jitter_ms, "
              "avg(jitter_buffer_delay_ms) AS jitter_buffer_delay_ms, sum(freezes) AS freezes, "
              "avg(concealment_percent) AS concealment_percent, "
              "avg(received_bitrate_bps) AS received_bitrate_bps, avg(sent_bitrate_bps) AS sent_bitrate_bps "
              "FROM rtc_report_summary_rates "
              "WHERE {RANGE} AND {CHANNELS} GROUP BY channel_id, connection_id "
              "ORDER BY loss_percent DESC, jitter_ms DESC",
              width=24, height=10, links=link,
              description="Worst first: average packet loss, jitter (the worst stream's), freezes "
              "and concealed audio of what each connection received, over all its streams."),
        panel(layout, backend, "table", "Round-trip time by connection",
              "SELECT channel_id, connection_id, avg(round_trip_time) AS rtt, "
              "max(round_trip_time) AS max_rtt, avg(current_round_trip_time) AS ice_rtt, "
              "avg(fraction_lost) AS fraction_lost "
              "FROM rtc_report_summary WHERE {RANGE} AND {CHANNELS} "
              "GROUP BY channel_id, connection_id ORDER BY rtt DESC",
              width=24, height=8, links=link, unit="s",
              description="rtt: the receivers' reports (remote-inbound-rtp, the worst stream's); "
              "ice_rtt: the selected candidate pair's."),
    ]
    variables = [
        variable(backend, "channel_id", "Channel",
                 CHANNEL_QUERY,
                 multi=True),
    ]
    links = [{"title": "Connection", "type": "link", "url": f"/d/{uid(backend, 'connection')}/kohaku-connection",
              "keepTime": True, "includeVars": False}]
    return dashboard(backend, "overview", "Overview",
                     "Channels and connections seen in the time range, and who suffers.",
                     panels, variables, links)


def connection(backend):
    layout = Layout()
    inbound = "FROM rtc_inbound_rtp_rates WHERE {CONNECTION}"
    outbound = "FROM rtc_outbound_rtp_rates WHERE {CONNECTION}"
    panels = [
        panel(layout, backend, "table", "Connection",
              "SELECT channel_id, connection_id, session_id, client_id, group_id, role, node_name AS sora_node, "
              "version AS sora_version, simulcast, spotlight, first_seen, last_seen FROM sora_connection "
              "WHERE channel_id = ${channel_id:singlequote} AND connection_id = ${connection_id:singlequote}",
              width=24, height=4),
        layout.row("Received (inbound-rtp)"),
        panel(layout, backend, "timeseries", "Received bitrate",
              f"SELECT {{TIME}}, {{SERIES}}, bitrate_bps {inbound} ORDER BY 1", unit="bps", minimum=0),
        panel(layout, backend, "timeseries", "Packet loss (received)",
              f"SELECT {{TIME}}, {{SERIES}}, packet_loss_percent {inbound} ORDER BY 1",
              unit="percent", minimum=0),
        panel(layout, backend, "timeseries", "Jitter",
              f"SELECT {{TIME}}, {{SERIES}}, jitter_ms {inbound} ORDER BY 1", unit="ms", minimum=0),
        panel(layout, backend, "timeseries", "Jitter buffer delay",
              f"SELECT {{TIME}}, {{SERIES}}, jitter_buffer_delay_ms {inbound} ORDER BY 1",
              unit="ms", minimum=0),
        panel(layout, backend, "timeseries", "Frames decoded and dropped per second (video)",
              f"SELECT {{TIME}}, rtc_id AS metric, frames_decoded_per_second, frames_dropped_per_second "
              f"{inbound} AND kind = 'video' ORDER BY 1", unit="short", minimum=0),
        panel(layout, backend, "timeseries", "Received frame rate (video)",
              f"SELECT {{TIME}}, rtc_id AS metric, frames_per_second {inbound} AND kind = 'video' "
              "ORDER BY 1", unit="short", minimum=0),
        panel(layout, backend, "timeseries", "Received resolution (video)",
              f"SELECT {{TIME}}, rtc_id AS metric, frame_width, frame_height {inbound} "
              "AND kind = 'video' ORDER BY 1", unit="px", minimum=0),
        panel(layout, backend, "timeseries", "Freezes (video)",
              f"SELECT {{TIME}}, rtc_id AS metric, freezes, freeze_seconds {inbound} "
              "AND kind = 'video' ORDER BY 1", unit="short", minimum=0),
        panel(layout, backend, "timeseries", "Concealed audio",
              f"SELECT {{TIME}}, rtc_id AS metric, concealment_percent {inbound} AND kind = 'audio' "
              "ORDER BY 1", unit="percent", minimum=0),
        panel(layout, backend, "timeseries", "NACK and PLI sent",
              f"SELECT {{TIME}}, {{SERIES}}, nacks_per_second, plis_per_second {inbound} ORDER BY 1",
              unit="short", minimum=0),
        layout.row("Sent (outbound-rtp)"),
        panel(layout, backend, "timeseries", "Sent bitrate",
              f"SELECT {{TIME}}, {{OUTBOUND_SERIES}}, bitrate_bps, target_bitrate_bps {outbound} "
              "ORDER BY 1", unit="bps", minimum=0),
        panel(layout, backend, "timeseries", "Sent frame rate (video)",
              f"SELECT {{TIME}}, {{OUTBOUND_SERIES}}, frames_per_second, frames_encoded_per_second "
              f"{outbound} AND kind = 'video' ORDER BY 1", unit="short", minimum=0),
        panel(layout, backend, "timeseries", "Sent resolution (video)",
              f"SELECT {{TIME}}, {{OUTBOUND_SERIES}}, frame_width, frame_height {outbound} "
              "AND kind = 'video' ORDER BY 1", unit="px", minimum=0),
        panel(layout, backend, "table", "Quality limitation (video)",
              "SELECT rtc_id, rid, quality_limitation_reason, count(*) AS samples, "
              "max(encoder_implementation) AS encoder "
              f"{outbound} AND kind = 'video' GROUP BY rtc_id, rid, quality_limitation_reason "
              "ORDER BY rtc_id, samples DESC",
              description="How many samples the encoder reported each limitation reason "
              "(none, bandwidth, cpu, other)."),
        panel(layout, backend, "timeseries", "Retransmissions",
              f"SELECT {{TIME}}, {{OUTBOUND_SERIES}}, retransmitted_bitrate_bps {outbound} ORDER BY 1",
              unit="bps", minimum=0),
        panel(layout, backend, "timeseries", "NACK and PLI received",
              f"SELECT {{TIME}}, {{OUTBOUND_SERIES}}, nacks_per_second, plis_per_second {outbound} "
              "ORDER BY 1", unit="short", minimum=0),
        layout.row("Network"),
        panel(layout, backend, "timeseries", "Round-trip time (remote-inbound-rtp)",
              "SELECT {TIME}, {SERIES}, round_trip_time FROM rtc_remote_inbound_rtp "
              "WHERE {CONNECTION} ORDER BY 1", unit="s", minimum=0),
        panel(layout, backend, "timeseries", "Loss reported by the receiver (remote-inbound-rtp)",
              "SELECT {TIME}, {SERIES}, fraction_lost FROM rtc_remote_inbound_rtp "
              "WHERE {CONNECTION} ORDER BY 1", unit="percentunit", minimum=0, maximum=1),
        panel(layout, backend, "timeseries", "Candidate pair round-trip time",
              "SELECT {TIME}, rtc_id AS metric, current_round_trip_time FROM rtc_candidate_pair "
              "WHERE {CONNECTION} AND current_round_trip_time IS NOT NULL ORDER BY 1",
              unit="s", minimum=0),
        panel(layout, backend, "timeseries", "Available outgoing bitrate",
              "SELECT {TIME}, rtc_id AS metric, available_outgoing_bitrate FROM rtc_candidate_pair "
              "WHERE {CONNECTION} AND available_outgoing_bitrate IS NOT NULL ORDER BY 1",
              unit="bps", minimum=0),
        layout.row("Setup"),
        panel(layout, backend, "table", "Codecs in use",
              "SELECT DISTINCT mime_type, payload_type, clock_rate, channels, sdp_fmtp_line "
              "FROM rtc_codec WHERE {CONNECTION} ORDER BY mime_type, payload_type"),
        panel(layout, backend, "table", "Transport",
              "SELECT rtc_id, ice_state, dtls_state, dtls_role, tls_version, dtls_cipher, srtp_cipher, "
              "selected_candidate_pair_changes FROM rtc_transport WHERE {CONNECTION} "
              "ORDER BY {T} DESC LIMIT 1"),
        panel(layout, backend, "table", "ICE candidates",
              "SELECT DISTINCT side, candidate_type, protocol, relay_protocol, network_type, address, port "
              "FROM rtc_ice_candidate WHERE {CONNECTION} ORDER BY side, candidate_type",
              width=24),
    ]
    variables = [
        variable(backend, "channel_id", "Channel",
                 CHANNEL_QUERY),
        variable(backend, "connection_id", "Connection",
                 "SELECT connection_id FROM sora_connection WHERE channel_id = ${channel_id:singlequote} "
                 "AND {CONN_RANGE} ORDER BY last_seen DESC"),
    ]
    links = [{"title": "Overview", "type": "link", "url": f"/d/{uid(backend, 'overview')}/kohaku-overview",
              "keepTime": True, "includeVars": False}]
    return dashboard(backend, "connection", "Connection",
                     "One connection's media quality: what it received and sent, its network, "
                     "its codecs and transport.",
                     panels, variables, links)


def main():
    for backend in BACKENDS:
        directory = ROOT / "dashboards" / backend
        directory.mkdir(parents=True, exist_ok=True)
        for name, build in (("overview", overview), ("connection", connection)):
            path = directory / f"{name}.json"
            path.write_text(json.dumps(build(backend), indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
