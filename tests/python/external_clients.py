"""Reads a gold table with pyarrow.flight and calls the coordinator through gRPC reflection
only (no generated code), as any external client would. Prints one JSON object."""

import argparse
import json

import grpc
import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def read_gold(flight_addr: str, layer: str, table: str) -> tuple[pa.Table, list[str]]:
    """The table, and the paths of every table the service lists."""
    client = flight.connect(f"grpc://{flight_addr}")
    info = client.get_flight_info(flight.FlightDescriptor.for_path(layer, table))
    parts = [client.do_get(endpoint.ticket).read_all() for endpoint in info.endpoints]
    listed = [".".join(p.decode() for p in f.descriptor.path[:2]) for f in client.list_flights()]
    return (pa.concat_tables(parts) if parts else info.schema.empty_table()), sorted(listed)


def call(channel, pool, service: str, method: str, fields=None):
    """Calls a unary method knowing only its name: types come from server reflection."""
    desc = pool.FindServiceByName(service).FindMethodByName(method)
    request_cls = message_factory.GetMessageClass(desc.input_type)
    response_cls = message_factory.GetMessageClass(desc.output_type)
    stub = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    return stub(request_cls(**(fields or {})), timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coordinator", required=True, help="host:port")
    parser.add_argument("--aggregator", required=True, help="host:port of the gold Flight service")
    parser.add_argument("--table", default="gold.pricing_summary")
    args = parser.parse_args()

    layer, name = args.table.split(".", 1)
    table, listed = read_gold(args.aggregator, layer, name)

    channel = grpc.insecure_channel(args.coordinator)
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    health = call(channel, pool, "grpc.health.v1.Health", "Check", {"service": ""})
    pipelines = call(channel, pool, "medallion.v1.PipelineService", "ListPipelines")

    print(
        json.dumps(
            {
                "rows": table.num_rows,
                "columns": table.column_names,
                "first": {k: str(v[0]) for k, v in table.to_pydict().items()} if table.num_rows else {},
                "listed": listed,
                "health": health.status,
                "pipelines": sorted(p.name for p in pipelines.pipelines),
            }
        )
    )


if __name__ == "__main__":
    main()
