"""Schemas and generated code for the Avro and Protobuf tests."""
