-- The application's database beside Dagster's, with pgvector.
CREATE DATABASE app;
\connect app
CREATE EXTENSION IF NOT EXISTS vector;
