-- The golden table: one column of each type family, and the row the golden files describe.
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE golden (id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric(10,2), f4 real,
    f8 float8, b bool, t text, by bytea, j json, jb jsonb, u uuid, d date, tm time, ts timestamp,
    tstz timestamptz, ai int[], at text[], m mood);
