-- Sample schema and data for the docker-compose stack.
CREATE TABLE customers (
    id      serial PRIMARY KEY,
    name    text NOT NULL,
    email   text UNIQUE,
    created timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id int NOT NULL REFERENCES customers (id),
    total       numeric(12, 2) NOT NULL,
    status      text NOT NULL DEFAULT 'new',
    placed      timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (name, email)
SELECT 'customer ' || g, 'customer' || g || '@example.com' FROM generate_series(1, 100) g;
INSERT INTO orders (customer_id, total)
SELECT 1 + (g % 100), round((random() * 500)::numeric, 2) FROM generate_series(1, 1000) g;
