#!/usr/bin/env python3
"""Writes docker/kibana/saved_objects.ndjson: the Kibana 8.x saved objects that
the setup-kibana service imports (POST /api/saved_objects/_import?overwrite=true).

Edit this file, then run `python3 docker/kibana/saved_objects.py`; the ndjson is
what Kibana imports and what docker/check-compose.sh checks. Ids are stable, so
a re-import overwrites instead of duplicating.

What the documents look like (actors/src/es_writer/bulk.rs):

* mirror index `cdc_<schema>_<table>`: the row's columns plus
  `_cdc: {op, lsn, ts_ms}`; `_cdc.ts_ms` is the commit time (mapped `date`).
  It holds current state only: no history, no deletes.
* history index `cdc_<schema>_<table>_history` (elasticsearch.history = true):
  the whole change envelope `{before, after, op, ts_ms, source: {connector, db,
  schema, table, lsn, commit_lsn, seq, txId, ts_ms, snapshot}}` plus
  `@timestamp` (= source.ts_ms, commit time, mapped `date`), `key` (the primary
  key object); `op` is mapped `keyword`, the rest is dynamic (strings become
  text + `.keyword`). Top-level `ts_ms` is when pgcdc encoded the Kafka record.
  docker/setup/setup.sh adds `ingested_at` (when ES indexed the document) with
  an ingest pipeline.

Not in Elasticsearch, so not in these objects: replication lag in bytes and
dead-letter counts (Prometheus, /metrics) and the dead-letter records
themselves (Kafka topic `pgcdc-dead-letters`). A markdown panel says so.
"""

import json
import pathlib
import sys

OUT = pathlib.Path(__file__).with_name("saved_objects.ndjson")
HISTORY = "pgcdc-history"
MIRROR = "pgcdc-mirror"
CORE = "8.8.0"
UPDATED = "2024-11-26T00:00:00.000Z"


def dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# Runtime fields of the history data view (Painless). Snapshot rows (op=r) are
# left out: their times describe the copy, not a commit.
NOT_SNAPSHOT = (
    "boolean snap = doc.containsKey('source.snapshot') && doc['source.snapshot'].size() > 0"
    " && doc['source.snapshot'].value;"
)
RUNTIME = {
    "capture_latency_ms": {
        "type": "long",
        "script": {
            "source": NOT_SNAPSHOT
            + " if (!snap && doc.containsKey('ts_ms') && doc['ts_ms'].size() > 0"
            " && doc.containsKey('source.ts_ms') && doc['source.ts_ms'].size() > 0)"
            " { emit(doc['ts_ms'].value - doc['source.ts_ms'].value); }"
        },
    },
    "end_to_end_latency_ms": {
        "type": "long",
        "script": {
            "source": NOT_SNAPSHOT
            + " if (!snap && doc.containsKey('ingested_at') && doc['ingested_at'].size() > 0"
            " && doc['@timestamp'].size() > 0)"
            " { emit(doc['ingested_at'].value.toInstant().toEpochMilli()"
            " - doc['@timestamp'].value.toInstant().toEpochMilli()); }"
        },
    },
}


def data_view(id_, title, name, time_field, runtime=None):
    return {
        "attributes": {
            "fieldAttrs": "{}",
            "fieldFormatMap": "{}",
            "fields": "[]",
            "name": name,
            "runtimeFieldMap": dumps(runtime or {}),
            "sourceFilters": "[]",
            "timeFieldName": time_field,
            "title": title,
            "typeMeta": "{}",
        },
        "coreMigrationVersion": CORE,
        "id": id_,
        "managed": False,
        "references": [],
        "type": "index-pattern",
        "typeMigrationVersion": "8.0.0",
        "updated_at": UPDATED,
    }


def col_date(field="@timestamp"):
    return {
        "label": "Commit time",
        "customLabel": True,
        "dataType": "date",
        "operationType": "date_histogram",
        "sourceField": field,
        "isBucketed": True,
        "scale": "interval",
        "params": {"interval": "auto", "includeEmptyRows": True, "dropPartials": False},
    }


def col_count(label="Changes"):
    return {
        "label": label,
        "customLabel": True,
        "dataType": "number",
        "operationType": "count",
        "sourceField": "___records___",
        "isBucketed": False,
        "scale": "ratio",
        "params": {"emptyAsNull": True},
    }


def col_terms(field, label, order_by, size=10):
    return {
        "label": label,
        "customLabel": True,
        "dataType": "string",
        "operationType": "terms",
        "sourceField": field,
        "isBucketed": True,
        "scale": "ordinal",
        "params": {
            "size": size,
            "orderBy": {"type": "column", "columnId": order_by},
            "orderDirection": "desc",
            "otherBucket": True,
            "missingBucket": False,
            "parentFormat": {"id": "terms"},
            "include": [],
            "exclude": [],
            "includeIsRegex": False,
            "excludeIsRegex": False,
        },
    }


def col_metric(op, field, label):
    return {
        "label": label,
        "customLabel": True,
        "dataType": "number",
        "operationType": op,
        "sourceField": field,
        "isBucketed": False,
        "scale": "ratio",
        "params": {"emptyAsNull": True, "format": {"id": "number", "params": {"decimals": 0}}},
    }


XY_COMMON = {
    "legend": {"isVisible": True, "position": "right"},
    "valueLabels": "hide",
    "fittingFunction": "None",
    "axisTitlesVisibilitySettings": {"x": True, "yLeft": True, "yRight": True},
    "tickLabelsVisibilitySettings": {"x": True, "yLeft": True, "yRight": True},
    "labelsOrientation": {"x": 0, "yLeft": 0, "yRight": 0},
    "gridlinesVisibilitySettings": {"x": True, "yLeft": True, "yRight": True},
}


def lens(id_, title, description, vis_type, layer, columns, order, visualization, data_view_id=HISTORY):
    return {
        "attributes": {
            "description": description,
            "state": {
                "adHocDataViews": {},
                "datasourceStates": {
                    "formBased": {
                        "layers": {
                            layer: {
                                "columnOrder": order,
                                "columns": columns,
                                "incompleteColumns": {},
                                "sampling": 1,
                            }
                        }
                    },
                    "textBased": {"layers": {}},
                },
                "filters": [],
                "internalReferences": [],
                "query": {"language": "kuery", "query": ""},
                "visualization": visualization,
            },
            "title": title,
            "visualizationType": vis_type,
        },
        "coreMigrationVersion": CORE,
        "id": id_,
        "managed": False,
        "references": [
            {
                "id": data_view_id,
                "name": f"indexpattern-datasource-layer-{layer}",
                "type": "index-pattern",
            }
        ],
        "type": "lens",
        "typeMigrationVersion": "8.9.0",
        "updated_at": UPDATED,
    }


def changes_over_time(id_, title, description, layer, split_field, split_label):
    columns = {
        "split": col_terms(split_field, split_label, "count"),
        "time": col_date(),
        "count": col_count(),
    }
    vis = dict(XY_COMMON)
    vis["preferredSeriesType"] = "bar_stacked"
    vis["layers"] = [
        {
            "layerId": layer,
            "layerType": "data",
            "seriesType": "bar_stacked",
            "xAccessor": "time",
            "splitAccessor": "split",
            "accessors": ["count"],
            "palette": {"type": "palette", "name": "default"},
        }
    ]
    return lens(id_, title, description, "lnsXY", layer, columns, ["split", "time", "count"], vis)


MARKDOWN = """\
### pgcdc: what this dashboard shows

Charts read the **history** indices `cdc_<schema>_<table>_history` (data view
*pgcdc history*, time field `@timestamp` = the transaction's commit time): one
document per change, written by the ES sink with `elasticsearch.history = true`.
`op`: `c` insert, `u` update, `d` delete, `r` snapshot row, `t` truncate (no
history document: a truncate empties the mirror index). The current rows are in
the **mirror** indices `cdc_<schema>_<table>` (data view *pgcdc mirror*).

**Latency** (from the same documents, snapshot rows excluded): *capture* =
record encoded for Kafka (`ts_ms`) minus commit time; *end to end* = indexed by
Elasticsearch (`ingested_at`, set by the `pgcdc-ingested-at` ingest pipeline)
minus commit time.

**Not in Elasticsearch**, so not charted here:

* replication lag in WAL bytes: Prometheus `pgcdc_replication_lag_bytes`
* dead letters: Prometheus `pgcdc_dead_letters_total`; the records themselves,
  with the reason, are on the Kafka topic `pgcdc-dead-letters`

Prometheus: http://127.0.0.1:9090 (alerts at /alerts); pgcdc serves
`/metrics`, `/health` and `/ready` at http://127.0.0.1:9187.
"""


def markdown_vis(id_, title, text):
    return {
        "attributes": {
            "description": "",
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": dumps({"query": {"query": "", "language": "kuery"}, "filter": []})
            },
            "title": title,
            "uiStateJSON": "{}",
            "version": 1,
            "visState": dumps(
                {
                    "title": title,
                    "type": "markdown",
                    "aggs": [],
                    "params": {"fontSize": 12, "openLinksInNewTab": False, "markdown": text},
                }
            ),
        },
        "coreMigrationVersion": CORE,
        "id": id_,
        "managed": False,
        "references": [],
        "type": "visualization",
        "typeMigrationVersion": "7.14.0",
        "updated_at": UPDATED,
    }


def saved_search(id_, title, data_view_id, columns):
    return {
        "attributes": {
            "columns": columns,
            "description": "Every change pgcdc indexed, newest first (history indices).",
            "hits": 0,
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": dumps(
                    {
                        "highlightAll": True,
                        "version": True,
                        "query": {"query": "", "language": "kuery"},
                        "filter": [],
                        "indexRefName": "kibanaSavedObjectMeta.searchSourceJSON.index",
                    }
                )
            },
            "sort": [["@timestamp", "desc"]],
            "title": title,
            "version": 1,
        },
        "coreMigrationVersion": CORE,
        "id": id_,
        "managed": False,
        "references": [
            {
                "id": data_view_id,
                "name": "kibanaSavedObjectMeta.searchSourceJSON.index",
                "type": "index-pattern",
            }
        ],
        "type": "search",
        "typeMigrationVersion": "7.9.3",
        "updated_at": UPDATED,
    }


def dashboard(id_, title, description, panels):
    """panels: (panel index, saved object type, saved object id, x, y, w, h)."""
    panels_json = []
    refs = []
    for index, type_, obj_id, x, y, w, h in panels:
        panels_json.append(
            {
                "type": type_,
                "gridData": {"x": x, "y": y, "w": w, "h": h, "i": index},
                "panelIndex": index,
                "embeddableConfig": {"enhancements": {}},
                "panelRefName": f"panel_{index}",
            }
        )
        refs.append({"id": obj_id, "name": f"{index}:panel_{index}", "type": type_})
    return {
        "attributes": {
            "description": description,
            "kibanaSavedObjectMeta": {
                "searchSourceJSON": dumps({"query": {"query": "", "language": "kuery"}, "filter": []})
            },
            "optionsJSON": dumps(
                {
                    "useMargins": True,
                    "syncColors": False,
                    "syncCursor": True,
                    "syncTooltips": False,
                    "hidePanelTitles": False,
                }
            ),
            "panelsJSON": dumps(panels_json),
            "refreshInterval": {"pause": False, "value": 10000},
            "timeFrom": "now-1h",
            "timeRestore": True,
            "timeTo": "now",
            "title": title,
            "version": 1,
        },
        "coreMigrationVersion": CORE,
        "id": id_,
        "managed": False,
        "references": refs,
        "type": "dashboard",
        "typeMigrationVersion": "8.9.0",
        "updated_at": UPDATED,
    }


def objects():
    history = data_view(
        HISTORY,
        "cdc_*_history",
        "pgcdc history (one document per change)",
        "@timestamp",
        RUNTIME,
    )
    # The mirror pattern leaves the history indices out (they also start with cdc_).
    mirror = data_view(
        MIRROR,
        "cdc_*,-cdc_*_history",
        "pgcdc mirror (current rows)",
        "_cdc.ts_ms",
    )
    by_table = changes_over_time(
        "pgcdc-changes-by-table",
        "Changes over time by table",
        "History documents per commit-time interval, split by source.table.",
        "layer-by-table",
        "source.table.keyword",
        "Table",
    )
    by_op = changes_over_time(
        "pgcdc-changes-by-op",
        "Changes over time by operation",
        "History documents per commit-time interval, split by op (c, u, d, r).",
        "layer-by-op",
        "op",
        "Operation",
    )
    table_op = lens(
        "pgcdc-changes-table-op",
        "Changes by table and operation",
        "Count of history documents in the time range, per table and op.",
        "lnsDatatable",
        "layer-table-op",
        {
            "table": col_terms("source.table.keyword", "Table", "count", size=50),
            "op": col_terms("op", "Operation", "count", size=10),
            "count": col_count(),
        },
        ["table", "op", "count"],
        {
            "layerId": "layer-table-op",
            "layerType": "data",
            "columns": [
                {"columnId": "table"},
                {"columnId": "op"},
                {"columnId": "count"},
            ],
        },
    )
    latency_vis = dict(XY_COMMON)
    latency_vis["preferredSeriesType"] = "line"
    latency_vis["layers"] = [
        {
            "layerId": "layer-latency",
            "layerType": "data",
            "seriesType": "line",
            "xAccessor": "time",
            "accessors": ["e2e_avg", "e2e_max", "capture_avg"],
            "palette": {"type": "palette", "name": "default"},
        }
    ]
    latency = lens(
        "pgcdc-latency",
        "Latency from commit (ms)",
        "From the history documents (snapshot rows excluded): capture = ts_ms - commit time; "
        "end to end = ingested_at - commit time. Replays rewrite documents and show as spikes.",
        "lnsXY",
        "layer-latency",
        {
            "time": col_date(),
            "e2e_avg": col_metric("average", "end_to_end_latency_ms", "End to end, average"),
            "e2e_max": col_metric("max", "end_to_end_latency_ms", "End to end, max"),
            "capture_avg": col_metric("average", "capture_latency_ms", "Capture (to Kafka record), average"),
        },
        ["time", "e2e_avg", "e2e_max", "capture_avg"],
        latency_vis,
    )
    notes = markdown_vis("pgcdc-notes", "pgcdc: about this dashboard", MARKDOWN)
    recent = saved_search(
        "pgcdc-recent-changes",
        "pgcdc: recent changes",
        HISTORY,
        ["source.table", "op", "source.commit_lsn", "source.txId", "source.snapshot"],
    )
    dash = dashboard(
        "pgcdc-overview",
        "pgcdc: changes",
        "Changes captured by pgcdc, from the Elasticsearch history indices (docker-compose stack).",
        [
            ("by-table", "lens", by_table["id"], 0, 0, 24, 14),
            ("by-op", "lens", by_op["id"], 24, 0, 24, 14),
            ("table-op", "lens", table_op["id"], 0, 14, 16, 15),
            ("latency", "lens", latency["id"], 16, 14, 32, 15),
            ("notes", "visualization", notes["id"], 0, 29, 16, 22),
            ("recent", "search", recent["id"], 16, 29, 32, 22),
        ],
    )
    return [history, mirror, by_table, by_op, table_op, latency, notes, recent, dash]


def main():
    text = "\n".join(dumps(o) for o in objects()) + "\n"
    if "--check" in sys.argv[1:]:
        # Used by docker/check-compose.sh: the committed ndjson must be this script's output.
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT.name} is not the output of {pathlib.Path(__file__).name}: run it", file=sys.stderr)
            sys.exit(1)
        return
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} objects to {OUT}")


if __name__ == "__main__":
    main()
